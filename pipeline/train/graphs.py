"""An epoch's steps run eagerly, or on a GPU replayed as CUDA graphs: a Python step launches hundreds of small
kernels, a graph replay one."""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from duch.pipeline.config import TrainConfig
from duch.pipeline.train.step import StepState, fused_paper_terms, fused_terms, paper_terms, train_step


class GraphedSteps:
    """`count` consecutive training steps on batches of `size` items, replayed as one CUDA graph: a Python step
    launches hundreds of small kernels, a replay one (a few steps per replay spare the host some launches; on an
    H100 the step is bound by its kernels on the GPU, so 8 steps per replay measured the same as 1). The first
    `warmup` calls run eagerly on a side stream (Adam's state, cuBLAS handles, autograd's buffers and any
    compilation happen there, outside the capture); the next call captures and replays. Every call trains on the
    items it is given: [count x size] positions in the training set, taken in order."""

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], None], count: int, size: int,
                 device: torch.device, warmup: int = 2):
        self.step, self.count, self.size, self.warmup, self.calls, self.graph = step, count, size, warmup, 0, None
        self.idx = torch.zeros(count * size, dtype=torch.long, device=device)
        self.eps = torch.zeros(count * size, 1, device=device)

    def steps(self) -> None:
        for start in range(0, self.count * self.size, self.size):
            self.step(self.idx[start:start + self.size], self.eps[start:start + self.size])

    def __call__(self, idx: torch.Tensor, eps: torch.Tensor) -> None:
        self.idx.copy_(idx)
        self.eps.copy_(eps)
        if self.graph is None and self.calls < self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.steps()
            torch.cuda.current_stream().wait_stream(side)
        elif self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.steps()
        if self.graph is not None:
            self.graph.replay()
        self.calls += 1


STEPS_PER_GRAPH = 8


def graph_chunks(batches: list[tuple[int, int]], most: int = STEPS_PER_GRAPH) -> list[list[tuple[int, int]]]:
    """The epoch's batches in runs of up to `most` consecutive batches of one size: one CUDA graph replay each.
    Batches are contiguous, so a run's items are one slice of the epoch's order."""
    chunks: list[list[tuple[int, int]]] = []
    for a, b in batches:
        last = chunks[-1] if chunks else None
        if last and len(last) < most and last[0][1] - last[0][0] == b - a:
            last.append((a, b))
        else:
            chunks.append([(a, b)])
    return chunks


EpochRunner = Callable[[torch.Tensor, torch.Tensor, list], None]


def epoch_runner(state: StepState, cfg: TrainConfig, graphs: bool, compile_terms: bool = False) -> EpochRunner:
    """run(order, eps, batches): the epoch's steps, batch (a, b) on the items at order[a:b] with eps[a:b]. Eagerly
    with train_step, or on a GPU as CUDA graphs (one per run length and batch size) of the step with fused loss
    terms, optionally compiled by torch.compile into a few kernels (the discriminator step cannot be: its gradient
    penalty differentiates twice, which torch.compile does not support)."""
    if not graphs:
        step = functools.partial(train_step, state, cfg, terms_of=paper_terms)

        def run_eager(order: torch.Tensor, eps: torch.Tensor, batches: list) -> None:
            for a, b in batches:
                step(order[a:b], eps[a:b])

        return run_eager
    fused = torch.compile(fused_paper_terms, dynamic=False, fullgraph=True) if compile_terms else fused_paper_terms
    step = functools.partial(train_step, state, cfg, terms_of=fused_terms(fused))
    captured: dict[tuple[int, int], GraphedSteps] = {}

    def run_graphs(order: torch.Tensor, eps: torch.Tensor, batches: list) -> None:
        for chunk in graph_chunks(batches):
            (a, b), stop = chunk[0], chunk[-1][1]
            key = (len(chunk), b - a)
            if key not in captured:
                captured[key] = GraphedSteps(step, *key, order.device)
            captured[key](order[a:stop], eps[a:stop])

    return run_graphs


def use_graphs(device: torch.device, cfg: TrainConfig) -> bool:
    """CUDA graphs on a GPU unless the config turns them off (a switch for comparisons and debugging)."""
    return device.type == "cuda" and cfg.cuda_graphs


def use_compile(graphs: bool, cfg: TrainConfig) -> bool:
    """torch.compile of the loss terms, with the CUDA graphs only: 10% more steps per second on an H100, after
    some 20 s of compilation per code length, so off by default (it pays off only for long runs)."""
    return graphs and cfg.compile_terms

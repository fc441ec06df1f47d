"""Training one code length: DUCH's optimizers and schedules, the epochs, validation, and checkpoints a killed run
resumes from to the same weights."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from duch.data.splits import Split
from duch.pipeline import DuchError
from duch.pipeline.config import TrainConfig
from duch.pipeline.formats.checkpoint import load_checkpoint, remove_checkpoint, save_checkpoint
from duch.pipeline.model.heads import CodeDiscriminator, DuchHeads
from duch.pipeline.model.noise import clean_probability
from duch.pipeline.retrieval.metrics import DIRECTIONS
from duch.pipeline.train.data import TrainData, sample_views
from duch.pipeline.train.graphs import epoch_runner, use_compile, use_graphs
from duch.pipeline.train.step import LOSS_TERMS, StepState, binary_targets
from duch.pipeline.train.validate import evaluate_codes


def make_optimizers(heads: DuchHeads, disc: CodeDiscriminator, cfg: TrainConfig, device: torch.device,
                    graphs: bool) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """DUCH's two Adams. Replayed in a CUDA graph they must be capturable and read the learning rate from a device
    tensor, which StepLR then updates in place (a Python float would be frozen into the graph)."""
    if graphs:
        lr = lambda value: torch.tensor(value, device=device)  # noqa: E731
        extra = {"capturable": True, "fused": True}
    else:
        lr, extra = float, {}
    opt = torch.optim.Adam(heads.parameters(), lr=lr(cfg.lr), weight_decay=cfg.weight_decay, **extra)
    disc_opt = torch.optim.Adam(disc.parameters(), lr=lr(cfg.disc_lr), betas=cfg.disc_betas,
                                weight_decay=cfg.disc_weight_decay, **extra)
    return opt, disc_opt


def epoch_batches(n: int, batch_size: int, drop_last: bool) -> list[tuple[int, int]]:
    """(start, stop) of each batch an epoch trains on, in order: BatchNorm needs 2 items, and drop_last skips a
    short last batch. Only the last batch can be skipped, so the batches trained on cover [0, stop of the last)."""
    batches = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    return [(a, b) for a, b in batches if b - a >= 2 and not (drop_last and b - a < batch_size)]


def epoch_row(epoch: int, sums: torch.Tensor, steps: int) -> dict:
    """The epoch's mean loss terms: the one read of the device per epoch."""
    return {"epoch": epoch, **{k: v / max(steps, 1) for k, v in zip(LOSS_TERMS, sums.tolist())}}


@dataclass
class Checkpoints:
    """Where and under which fingerprint a code length saves its checkpoints, every cfg.checkpoint_every epochs."""

    folder: Path
    fingerprint: str
    echo: Callable[[str], None] = print


def training_state(state: StepState, schedules: list, gen: torch.Generator, log: dict) -> dict:
    """Everything the next epoch reads: weights, BatchNorm statistics, both optimizers' moments and steps, the
    schedules, the random generators, the binary targets and code sums, the banks, and the history so far."""
    return {"heads": state.heads.state_dict(), "disc": state.disc.state_dict(), "opt": state.opt.state_dict(),
            "disc_opt": state.disc_opt.state_dict(), "schedules": [s.state_dict() for s in schedules],
            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "targets": state.targets,
            "code_sums": state.code_sums, "banks": state.banks, "agreement": state.agreement, "clean": state.clean,
            "log": log}


def restore_training_state(saved: dict, state: StepState, schedules: list, gen: torch.Generator) -> dict:
    """Put a checkpoint back into the live objects, in place where a CUDA graph may later capture them; returns
    its log (history, evaluations, timings)."""
    state.heads.load_state_dict(saved["heads"])
    state.disc.load_state_dict(saved["disc"])
    for opt, saved_opt in ((state.opt, saved["opt"]), (state.disc_opt, saved["disc_opt"])):
        _load_optimizer(opt, saved_opt)
    for schedule, saved_schedule in zip(schedules, saved["schedules"]):
        schedule.load_state_dict(saved_schedule)
    gen.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    state.targets.copy_(saved["targets"])
    state.code_sums.copy_(saved["code_sums"])
    if state.banks is not None:
        for name, bank in state.banks.items():
            bank.copy_(saved["banks"][name])
    if state.clean is not None:
        state.agreement.copy_(saved["agreement"])
        state.clean.copy_(saved["clean"])
    return saved["log"]


def check_state(saved: dict, state: StepState, schedules: list, gen: torch.Generator) -> None:
    """A checkpoint's state has the form this training's own has (keys, types, tensor shapes and dtypes; the
    optimizers' moments shaped as their parameters), so that restoring it cannot break a later step: raises
    ValueError naming the first place it differs. The log is check_log's."""
    fresh = training_state(state, schedules, gen, {})
    if set(saved) != set(fresh):
        raise ValueError(f"it holds {sorted(saved)}")
    for key, value in fresh.items():
        if key in ("opt", "disc_opt"):
            live = state.opt if key == "opt" else state.disc_opt
            groups = saved[key]["param_groups"]
            if len(groups) != len(value["param_groups"]):
                raise ValueError(f"{key} has {len(groups)} parameter groups")
            for mine, theirs in zip(value["param_groups"], groups):  # keys may differ across torch versions
                for name in set(mine) & set(theirs):
                    _same_form(mine[name], theirs[name], f"{key}.{name}")
            params = [p for group in live.param_groups for p in group["params"]]
            for index, moments in saved[key]["state"].items():
                _same_form({"step": torch.zeros(()), "exp_avg": params[index], "exp_avg_sq": params[index]},
                           moments, f"{key}.state.{index}")
        elif key != "log":
            _same_form(value, saved[key], key)


def _same_form(fresh, saved, where: str) -> None:
    if isinstance(fresh, torch.Tensor):
        if not isinstance(saved, torch.Tensor) or saved.shape != fresh.shape or saved.dtype != fresh.dtype:
            raise ValueError(f"{where} is not a {fresh.dtype} tensor of shape {tuple(fresh.shape)}")
    elif isinstance(fresh, dict):
        if not isinstance(saved, dict) or set(saved) != set(fresh):
            raise ValueError(f"{where} does not hold the keys {sorted(map(str, fresh))[:8]}")
        for key in fresh:
            _same_form(fresh[key], saved[key], f"{where}.{key}")
    elif isinstance(fresh, (list, tuple)):
        if type(saved) is not type(fresh) or len(saved) != len(fresh):
            raise ValueError(f"{where} is not a {type(fresh).__name__} of {len(fresh)}")
        for i, (a, b) in enumerate(zip(fresh, saved)):
            _same_form(a, b, f"{where}[{i}]")
    elif type(saved) is not type(fresh) or (isinstance(fresh, float) and not math.isfinite(saved)):
        raise ValueError(f"{where} holds {type(saved).__name__} {str(saved)[:20]}, not {type(fresh).__name__}")


def check_log(log: dict, done: int) -> None:
    """A checkpoint's log as the reports read it: `done` rows of finite loss terms, validation rows with every
    direction's mAP, timings as numbers (raises ValueError naming what does not fit)."""
    rows, evals = log["history"], log["evals"]
    if not isinstance(rows, list) or len(rows) != done or any(
            not isinstance(r, dict) or set(r) != {"epoch", *LOSS_TERMS}
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in r.values()) for r in rows):
        raise ValueError(f"its history is not {done} rows of loss terms")
    if not isinstance(evals, list) or any(not isinstance(e, dict) or not isinstance(e.get("epoch"), int) or any(
            not isinstance(((e.get("map") or {}).get(d) or {}).get("reference"), (int, float)) for d in DIRECTIONS)
            for e in evals):
        raise ValueError("its validation rows lack mAPs")
    if not isinstance(log["seconds"], (int, float)) or not isinstance(log["epoch_seconds"], list) or any(
            not isinstance(t, (int, float)) for t in log["epoch_seconds"]):
        raise ValueError("its timings are not numbers")


def _load_optimizer(opt: torch.optim.Optimizer, saved: dict) -> None:
    """load_state_dict, keeping learning rates that are device tensors (CUDA-graph Adam) the same tensors: a
    graph reads the lr at the address it was captured with, and StepLR updates it in place."""
    live = [{k: v for k, v in group.items() if isinstance(v, torch.Tensor)} for group in opt.param_groups]
    opt.load_state_dict(saved)
    for group, tensors in zip(opt.param_groups, live):
        for key, tensor in tensors.items():
            tensor.copy_(torch.as_tensor(group[key]))
            group[key] = tensor


class StateDoesNotFit(Exception):
    """A checkpoint whose state was partly restored before it turned out not to fit this training."""


def resume(checkpoints: Checkpoints, bits: int, cfg: TrainConfig, state: StepState, schedules: list, gen) -> tuple:
    """(epochs done, the saved log) from the checkpoint in checkpoints.folder, its state restored into state,
    schedules and gen; (0, None) when there is none or it belongs to other settings. A checkpoint that passed its
    checks but does not fit (edited where no checksum guards it) is removed and StateDoesNotFit raised."""
    done, saved = load_checkpoint(checkpoints.folder, checkpoints.fingerprint)
    if done is None:
        if saved != "no checkpoint":
            checkpoints.echo(f"train-hash: {bits} bits: not resuming ({saved}); training from the start")
        return 0, None
    try:
        if not 0 < done < cfg.epochs:
            raise ValueError(f"epoch {done} is not one before this run's last, {cfg.epochs}")
        check_state(saved, state, schedules, gen)
        log = restore_training_state(saved, state, schedules, gen)
        check_log(log, done)
    except Exception as e:  # edited where no checksum guards it (the JSON tree): it does not fit this run
        checkpoints.echo(f"train-hash: {bits} bits: not resuming (the checkpoint's state does not fit this "
                         f"training: {type(e).__name__}: {' '.join(str(e).split())[:200]}); training from the start")
        remove_checkpoint(checkpoints.folder)
        raise StateDoesNotFit from e
    checkpoints.echo(f"train-hash: {bits} bits: resuming from the checkpoint after epoch {done} of {cfg.epochs}")
    return done, log


@dataclass
class TrainedBits:
    """One code length trained: its heads and discriminator, the loss terms per epoch, the validation rows, and
    the training time (in all, and per epoch; a resumed run counts the epochs before the kill)."""

    heads: DuchHeads
    disc: CodeDiscriminator
    history: list[dict]
    evals: list[dict]
    seconds: float
    epoch_seconds: list[float]


def train_bits(bits: int, cfg: TrainConfig, data: TrainData, split: Split, eval_text: torch.Tensor | None,
               labels: np.ndarray, progress: bool, graphs: bool | None = None,
               compile_terms: bool | None = None, checkpoints: Checkpoints | None = None) -> TrainedBits:
    """graphs: replay the steps as CUDA graphs (default: on a GPU, see use_graphs); compile_terms: with graphs,
    torch.compile the loss terms (default: see use_compile); checkpoints: save one every cfg.checkpoint_every
    epochs there, and resume from the one found there (None: neither). A checkpoint that turns out not to fit
    after it was partly restored is removed (resume), and the training starts again from the seeds."""
    while True:
        try:
            return _train_bits(bits, cfg, data, split, eval_text, labels, progress, graphs, compile_terms,
                               checkpoints)
        except StateDoesNotFit:
            continue  # the state was partly restored: rebuilt from the seeds, the checkpoint gone


def _train_bits(bits: int, cfg: TrainConfig, data: TrainData, split: Split, eval_text: torch.Tensor | None,
                labels: np.ndarray, progress: bool, graphs: bool | None, compile_terms: bool | None,
                checkpoints: Checkpoints | None) -> TrainedBits:
    device = data.image.device
    graphs = use_graphs(device, cfg) if graphs is None else graphs
    compile_terms = use_compile(graphs, cfg) if compile_terms is None else compile_terms
    torch.manual_seed(cfg.seed)  # weight init
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # views, batches, interpolates
    heads = DuchHeads(data.image.shape[1], data.text.shape[1], bits, cfg.hidden).to(device)
    disc = CodeDiscriminator(bits).to(device)
    opt, disc_opt = make_optimizers(heads, disc, cfg, device, graphs)
    schedules = [torch.optim.lr_scheduler.StepLR(o, cfg.lr_step, cfg.lr_decay) for o in (opt, disc_opt)]
    train = torch.as_tensor(split.train, device=device)
    n = len(train)
    history, evals, epoch_seconds = [], [], []
    evaluate = eval_text is not None and len(split.query) and (labels != "").all()
    t0 = time.perf_counter()
    # B for the first epoch from the initial heads; after that from the codes the heads produced while
    # training the previous epoch (as the reference code does): no extra forward pass over the archive.
    views = sample_views(data, train, gen, cfg.reference_quirks, cfg.augment_anchor)
    targets = binary_targets(heads, views)
    # Banks indexed by position in the training set, started from the first targets.
    banks = {"image": targets.clone(), "text": targets.clone()} if cfg.w_bank else None
    state = StepState(heads, disc, opt, disc_opt, list(views), targets, torch.zeros_like(targets), banks,
                      torch.zeros(len(LOSS_TERMS), dtype=torch.float64, device=device),
                      *((data.captions[train], data.text) if cfg.w_inter_all else ()))
    if cfg.robust_inter:
        state.agreement, state.clean = torch.zeros(n, device=device), torch.ones(n, device=device)
    done = 0
    if checkpoints is not None:
        # Everything above is rebuilt as an uninterrupted run builds it (the same draws from the same seeds), then
        # the checkpoint overwrites it with the state after its epoch: the epochs after it run as they would have.
        done, log = resume(checkpoints, bits, cfg, state, schedules, gen)
        if log is not None:
            history, evals, epoch_seconds = log["history"], log["evals"], log["epoch_seconds"]
            t0 -= log["seconds"]
    run_epoch = epoch_runner(state, cfg, graphs, compile_terms)
    batches = epoch_batches(n, cfg.batch_size, cfg.drop_last)
    covered = batches[-1][1] if batches else 0
    bar = tqdm(range(done + 1, cfg.epochs + 1), desc=f"{bits} bits", unit="epoch", disable=not progress,
               dynamic_ncols=True, initial=done, total=cfg.epochs)
    for epoch in bar:
        started = time.perf_counter()
        for buffer, view in zip(state.views, sample_views(data, train, gen, cfg.reference_quirks,
                                                          cfg.augment_anchor)):
            buffer.copy_(view)
        order = torch.randperm(n, generator=gen).to(device)
        # The epoch's interpolation weights in one draw: the same numbers, in the same order, as one draw per step.
        eps = torch.rand(covered, 1, generator=gen).to(device)
        state.sums.zero_()
        run_epoch(order, eps, batches)
        for schedule in schedules:
            schedule.step()
        state.targets.copy_(torch.where(state.code_sums >= 0, 1.0, -1.0))
        if cfg.robust_inter and epoch >= cfg.robust_warmup:
            state.clean.copy_(clean_probability(state.agreement))
        row = epoch_row(epoch, state.sums, len(batches))
        epoch_seconds.append(time.perf_counter() - started)
        if not all(math.isfinite(v) for v in row.values()):
            raise DuchError(f"{bits} bits: the loss became NaN/Inf at epoch {epoch}; lower `lr` or check the features")
        history.append(row)
        if evaluate and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            evals.append({"epoch": epoch, **evaluate_codes(heads, data, split, eval_text, labels, cfg.map_k,
                                                           cfg.view_ensemble)})
        bar.set_postfix(loss=f"{row['total']:.3f}", inter=f"{row['inter']:.3f}", disc=f"{row['discriminator']:.3f}",
                        items_s=f"{epoch * n / (time.perf_counter() - t0):.0f}")
        if checkpoints is not None and cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0 \
                and epoch < cfg.epochs:
            log = {"history": history, "evals": evals, "epoch_seconds": epoch_seconds,
                   "seconds": time.perf_counter() - t0}
            save_checkpoint(checkpoints.folder, epoch, checkpoints.fingerprint,
                            training_state(state, schedules, gen, log))
    bar.close()
    return TrainedBits(heads, disc, history, evals, time.perf_counter() - t0, epoch_seconds)

"""efficientnet-lite0 and minilm-l6 run by ONNX Runtime on the CPU, from their exports (onnx_cache.py).

Each export computes what the PyTorch encoder's `encode` does (efficientnet-lite0's pooled features; MiniLM's
mean-pooled, L2-normalised token states), and is checked against PyTorch on a probe input when it is made (cosine
>= PARITY, else refused). Once exported, loading reads the file alone: PyTorch's model is not built at all.

Threads: ONNX Runtime's intra-op pool takes as many threads as torch has in this process (the one knob, `threads`,
sets both; a dask worker's share of the cores, or the cores this process may use: compute/device.available_cores),
and does not spin between runs, so a busy machine's other work (a DataLoader's decoders, a search) gets the cores.
"""
from __future__ import annotations

import gc
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from duch.pipeline import DuchError
from duch.pipeline.compute.device import available_cores
from duch.pipeline.encoders.base import in_chunks
from duch.pipeline.encoders.onnx_cache import cached_export

PARITY = 0.9999  # least cosine between an export's embeddings and PyTorch's on the probe input
IMAGE_CHUNK = 16  # images per run: the activations stay in cache (as encoders/base.in_chunks for torch)
TEXT_BATCH = 128  # captions per run, sorted by length so that each batch is padded little
LAST: dict[str, str] = {}  # encoder -> what loading it last did ("cached", "exported (why)"): for tests and logs


def session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or min(torch.get_num_threads(), available_cores())
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # A pool that spins after each run holds the cores a while: on a shared CPU other threads wait for it.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_onnx(kind: str):
    if kind == "efficientnet-lite0":
        return OnnxEfficientNetLite0()
    if kind == "minilm-l6":
        return OnnxMiniLM()
    raise DuchError(f"no ONNX export of {kind}")


def _export(module: torch.nn.Module, args: tuple, names: list[str], dynamic: dict, path: Path) -> None:
    import contextlib
    import io

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's notes on axis names and the like
        torch.onnx.export(module, args, str(path), dynamo=True, input_names=names, output_names=["duch_embedding"],
                          dynamic_shapes=dynamic, optimize=True, verbose=False, external_data=False)


def _check_parity(kind: str, reference: np.ndarray, exported: np.ndarray) -> None:
    cos = (reference * exported).sum(1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(exported, axis=1)
    if not cos.min() >= PARITY:
        raise DuchError(f"the ONNX export of {kind} gives other embeddings than PyTorch (cosine {cos.min():.6f} < "
                        f"{PARITY}); use `runtime` torch")


class _Features(torch.nn.Module):
    """EfficientNet-Lite0's pooled features, what EfficientNetLite0.encode returns."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(pixels), pre_logits=True)


def _export_efficientnet(path: Path) -> None:
    from duch.pipeline.encoders.efficientnet_lite import IMAGE_SIZE, build_model

    module = _Features(build_model()).eval()
    probe = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    _export(module, (probe,), ["pixels"], {"pixels": {0: torch.export.Dim("batch", min=1, max=4096)}}, path)
    with torch.inference_mode():
        reference = module(probe).numpy()
    _check_parity("efficientnet-lite0", reference, session(path).run(None, {"pixels": probe.numpy()})[0])
    del module
    gc.collect()


class OnnxEfficientNetLite0:
    spec = "efficientnet-lite0"
    dim = 1280
    runtime = "onnx"

    def __init__(self):
        from duch.pipeline.encoders.efficientnet_lite import make_transform

        self.device = torch.device("cpu")
        path, LAST[self.spec] = cached_export(self.spec, _export_efficientnet)
        self.session = session(path)
        self.transform = make_transform()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return in_chunks(self._encode, pixels, self.device, IMAGE_CHUNK)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(pixels.detach().cpu().float().numpy())
        return torch.from_numpy(self.session.run(None, {"pixels": x})[0])


class _MeanPooled(torch.nn.Module):
    """MiniLM's token states mean-pooled over the real tokens and L2-normalised: sentence-transformers' pipeline."""

    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


PROBE_CAPTIONS = ["many planes are parked next to a long building in an airport",
                  "a green golf course with a pond", "boats"]


def _export_minilm(path: Path) -> None:
    from duch.pipeline.encoders.minilm import MiniLM

    torch_encoder = MiniLM("cpu")
    module = _MeanPooled(torch_encoder.model[0].auto_model).eval()
    tokens = torch_encoder.model.tokenizer(PROBE_CAPTIONS, padding=True, return_tensors="pt")
    batch, length = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("length", min=2, max=512)
    _export(module, (tokens["input_ids"], tokens["attention_mask"]), ["input_ids", "attention_mask"],
            {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}}, path)
    reference = torch_encoder.encode(PROBE_CAPTIONS).numpy()
    feed = {k: tokens[k].numpy().astype(np.int64) for k in ("input_ids", "attention_mask")}
    _check_parity("minilm-l6", reference, session(path).run(None, feed)[0])
    del module, torch_encoder
    gc.collect()


class OnnxMiniLM:
    spec = "minilm-l6"
    dim = 384
    runtime = "onnx"
    tokenizer = None  # the Rust tokenizer runs inside encode, as for the torch encoder

    def __init__(self, batch_size: int = TEXT_BATCH):
        from tokenizers import Tokenizer  # transformers' fast tokenizer without transformers (seconds of imports)

        from duch.pipeline.encoders.minilm import model_path

        self.device = torch.device("cpu")
        self.batch_size = batch_size
        folder = model_path()
        path, LAST[self.spec] = cached_export(self.spec, _export_minilm)
        self.session = session(path)
        self.max_length = int(json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"])
        self.tokens = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # As sentence-transformers tokenises: cut at its max_seq_length, padded to the batch's longest.
        self.tokens.enable_truncation(self.max_length)
        self.tokens.enable_padding(pad_id=self.tokens.token_to_id("[PAD]"), pad_token="[PAD]")

    def encode(self, texts: list[str]) -> torch.Tensor:
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths together: little padding
        for s in range(0, len(texts), self.batch_size):
            rows = order[s:s + self.batch_size]
            tokens = self.tokens.encode_batch([texts[i] for i in rows])
            feed = {"input_ids": np.array([t.ids for t in tokens], np.int64),
                    "attention_mask": np.array([t.attention_mask for t in tokens], np.int64)}
            out[rows] = self.session.run(None, feed)[0]
        return torch.from_numpy(out)

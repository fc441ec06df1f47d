"""Which runtime runs a frozen encoder: PyTorch eager, or its graph exported once to ONNX and run by ONNX Runtime.

On a CPU, ONNX Runtime runs the fused graph of the two default encoders faster than PyTorch eager (measured side by
side, docs/results.md section 14): efficientnet-lite0 several times over, minilm-l6 about 1.5x, with cosine
>= 0.9999 to PyTorch's embeddings. `auto` takes onnx there when it is installed (it is installed with duch), torch on
a GPU and for open_clip models (not exported: their architectures are open-ended).
"""
from __future__ import annotations

import importlib.util

from duch.pipeline import DuchError

RUNTIMES = ("auto", "torch", "onnx")
# The encoders with an ONNX export (encoders/onnx_encoders.py): both measured faster in ONNX Runtime on a CPU.
ONNX_KINDS = ("efficientnet-lite0", "minilm-l6")
ONNX_PACKAGES = ("onnxruntime", "onnx", "onnxscript")  # running, and exporting with torch.onnx's dynamo exporter
INSTALL_HINT = "pip install 'duch[onnx]'"


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise DuchError(f"unknown `runtime` {runtime!r}; use one of {', '.join(RUNTIMES)}")


def onnx_missing() -> list[str]:
    """The packages the onnx runtime needs that are not installed."""
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def resolve_runtime(runtime: str, kind: str, device_type: str) -> str:
    """The runtime ("torch" or "onnx") an encoder of `kind` ("efficientnet-lite0", "minilm-l6", "open_clip") runs in
    on a device of `device_type` ("cpu", "cuda"), for the choice `runtime`; a DuchError where onnx is asked for and
    cannot serve."""
    check_runtime(runtime)
    if runtime == "torch":
        return "torch"
    if runtime == "auto":
        usable = device_type == "cpu" and kind in ONNX_KINDS and not onnx_missing()
        return "onnx" if usable else "torch"
    missing = onnx_missing()
    if missing:
        raise DuchError(f"`runtime` onnx needs {', '.join(missing)}, not installed: {INSTALL_HINT}")
    if kind not in ONNX_KINDS:
        raise DuchError(f"`runtime` onnx runs {' and '.join(ONNX_KINDS)}, not {kind} encoders; use `runtime` torch "
                        "(or auto) for them")
    if device_type != "cpu":
        raise DuchError(f"`runtime` onnx runs on the CPU, and the device is {device_type}; use `runtime` torch (or "
                        "auto) on a GPU")
    return "onnx"

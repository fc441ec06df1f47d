"""Where the math runs and in which precision: `--device` and `--precision` resolved for this machine."""
from __future__ import annotations

import contextlib

import torch

from duch.pipeline import DuchError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DuchError(f"`device` {device}: no CUDA GPU is visible; use `device` cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": bf16 on a GPU or a CPU with native bf16 (AVX512-BF16), else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return "bf16" if native else "fp32"


def autocast_for(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast (the speed of half precision, the range of fp32) or full precision.
    "auto": bf16 on GPU, fp32 on CPU; "bf16" and "fp32" force one on any device."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a container's cpuset), capped by a cgroup v2
    CPU quota (docker --cpus: cpu.max "200000 100000" is 2 cores). os.cpu_count() counts the host's cores, and a
    thread pool sized from it oversubscribes a limited container."""
    import math
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def device_type(device: str) -> str:
    """"cuda" or "cpu": the kind of device `device` (a `--device` value) is, without checking that it exists (a
    driver without GPUs may hand CUDA work to a cluster's workers)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"

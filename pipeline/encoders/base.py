"""What the extract stage needs from an encoder, whatever its family."""
from __future__ import annotations

import contextlib
from typing import Callable, Protocol

import torch
from PIL import Image


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU (the speed of half precision, the range of fp32); full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class ImageEncoder(Protocol):
    spec: str
    dim: int
    device: torch.device
    # PIL RGB image -> float tensor [3, H, W]; a picklable callable, run in DataLoader worker processes.
    transform: Callable[[Image.Image], torch.Tensor]

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] (any device) -> float32 [B, dim] on CPU."""


class TextEncoder(Protocol):
    spec: str
    dim: int
    device: torch.device

    def encode(self, texts: list[str]) -> torch.Tensor:
        """A batch of captions -> float32 [B, dim] on CPU."""

"""DUCH's hashing heads and code discriminator (docs/design.md, "The model")."""
from __future__ import annotations

import torch
from torch import nn


class HashHead(nn.Module):
    """Linear(d, hidden) -> BatchNorm -> ReLU -> Linear(hidden, K) -> tanh: continuous codes in (-1, 1)^K."""

    def __init__(self, in_dim: int, bits: int, hidden: int = 4096):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, bits), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CodeDiscriminator(nn.Module):
    """Linear(K, 2K) -> BatchNorm -> ReLU -> Linear(2K, 1): tells text codes from image codes (a logit)."""

    def __init__(self, bits: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(bits, 2 * bits), nn.BatchNorm1d(2 * bits), nn.ReLU(inplace=True),
                                 nn.Linear(2 * bits, 1))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.net(codes).squeeze(1)


class DuchHeads(nn.Module):
    def __init__(self, image_dim: int, text_dim: int, bits: int, hidden: int = 4096):
        super().__init__()
        self.bits = bits
        self.image = HashHead(image_dim, bits, hidden)
        self.text = HashHead(text_dim, bits, hidden)

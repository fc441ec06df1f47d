"""The code rules every stage shares: a head's outputs in eval mode, an image's code as the mean over the image
and its augmented views, and the sign bits packed 8 to a byte. train-hash validates with them, encode-archive
writes the archive's codes with them, search codes its queries with them: one rule, one code."""
from __future__ import annotations

import numpy as np
import torch

from duch.pipeline.model.heads import HashHead


@torch.no_grad()
def encode(head: torch.nn.Module, x: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    """The head's outputs in eval mode (BatchNorm's running statistics), leaving the head in the mode it was."""
    was_training = head.training
    head.eval()
    out = torch.cat([head(x[s:s + batch]) for s in range(0, len(x), batch)])
    head.train(was_training)
    return out


@torch.no_grad()
def image_codes(head: torch.nn.Module, image: torch.Tensor, views: torch.Tensor | None) -> torch.Tensor:
    """Continuous codes of images [n, D]: the head's output, or with `views` [n, V, D] its mean over the image and
    the views (TrainConfig.view_ensemble), whose sign is the code."""
    codes = encode(head, image)
    if views is None or views.shape[1] == 0:
        return codes
    for v in range(views.shape[1]):
        codes += encode(head, views[:, v])
    return codes / (1 + views.shape[1])


@torch.no_grad()
def continuous_codes(head: HashHead, emb: np.ndarray, device: torch.device, batch: int,
                     views: np.ndarray | None = None) -> np.ndarray:
    """Head outputs in fp32 (what train-hash validates with) of stored embeddings, [n, K], batch by batch; with
    `views` [n, V, D] their mean over the image and its views, as image_codes."""
    out = []
    for s in range(0, len(emb), batch):
        x = torch.as_tensor(np.asarray(emb[s:s + batch], dtype=np.float32), device=device)
        v = None if views is None else torch.as_tensor(np.asarray(views[s:s + batch], dtype=np.float32), device=device)
        out.append(image_codes(head, x, v).float().cpu().numpy())
    if out:
        return np.concatenate(out)
    last = head.net[3]
    assert isinstance(last, torch.nn.Linear)  # HashHead's Linear(hidden, K): its width is the code length
    return np.zeros((0, last.out_features), np.float32)


def pack_codes(h: np.ndarray | torch.Tensor) -> np.ndarray:
    """sign(h) as bits (1 for h >= 0), packed 8 to a byte, big-endian: uint8 [N, K/8]."""
    h = h.detach().cpu().numpy() if isinstance(h, torch.Tensor) else np.asarray(h)
    return np.packbits(h >= 0, axis=1, bitorder="big")


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [N, K/8] -> {-1, +1} int8 [N, K]."""
    return np.unpackbits(packed, axis=1, count=bits, bitorder="big").astype(np.int8) * 2 - 1


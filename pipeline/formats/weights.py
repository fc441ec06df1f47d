"""A trained code length's weights, `bits-K/model.safetensors`: tensors only, never a pickle.

Keys `image_head.*`, `text_head.*`, `discriminator.*`; one metadata entry "duch", a JSON of the bits, hidden width,
input dimensions and the extract fingerprint. The same weights always make the same file, since its SHA-256
identifies the model downstream.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from duch.pipeline import DuchError
from duch.pipeline.model.heads import CodeDiscriminator, DuchHeads
from duch.pipeline.run.artifacts import sha256_file
from duch.pipeline.run.records import ModelFile, retrain_fix
from duch.pipeline.run.storage import atomic_write


def save_weights(path: Path, heads: DuchHeads, disc: CodeDiscriminator, metadata: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"image_head.{k}": v for k, v in heads.image.state_dict().items()}
    tensors |= {f"text_head.{k}": v for k, v in heads.text.state_dict().items()}
    tensors |= {f"discriminator.{k}": v for k, v in disc.state_dict().items()}
    with atomic_write(path) as tmp:
        # One metadata entry: safetensors writes a map of several in a random order.
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"duch": json.dumps({k: str(v) for k, v in metadata.items()}, sort_keys=True)})


def load_model(model: ModelFile, device: torch.device | str = "cpu") -> DuchHeads:
    """A trained code length's heads, on `device`, from the file its train-hash manifest lists (checksum checked)."""
    if sha256_file(model.path) != model.sha256:
        raise DuchError(f"{model.path} differs from the file its train-hash manifest lists; "
                        f"{retrain_fix(model.path.parents[2])}")
    return load_heads(model.path, model.image_dim, model.text_dim, model.bits, model.hidden).to(device)


def load_heads(path: Path, image_dim: int, text_dim: int, bits: int, hidden: int) -> DuchHeads:
    """Tensors only, through safetensors: nothing in the file can run code."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # a file that is not safetensors (a pickle put in its place, say) is refused unread
        raise DuchError(f"{path}: not a safetensors file of duch's ({type(e).__name__}: {e}); redo the train-hash "
                        "stage with `force` to remake it") from None
    heads = DuchHeads(image_dim, text_dim, bits, hidden)
    try:
        heads.image.load_state_dict({k[len("image_head."):]: v for k, v in tensors.items()
                                     if k.startswith("image_head.")})
        heads.text.load_state_dict({k[len("text_head."):]: v for k, v in tensors.items() if k.startswith("text_head.")})
    except RuntimeError as e:  # safetensors, but not these heads' tensors (missing, renamed, other shapes)
        raise DuchError(f"{path}: not the weights of {bits}-bit heads on {image_dim}/{text_dim}-d features "
                        f"({' '.join(str(e).split())[:200]}); redo the train-hash stage with `force` to "
                        "remake it") from None
    return heads.eval()

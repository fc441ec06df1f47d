"""Checkpoint files a user hands over are read as tensors only: nothing in them is ever run.

A PyTorch checkpoint is a pickle, and unpickling can call any function the file names (os.system, eval...).
`torch.load(weights_only=True)` unpickles with an allow-list of tensor and container types and refuses anything
else; safetensors files hold no code at all. Every checkpoint path duch is given goes through `load_tensors` (or
`check_tensors_only` before a library that loads it by path), so a hostile file is refused before any library
could unpickle it with weaker settings (open_clip, for one, retries `torch.load` without `weights_only` when the
first call raises TypeError).
"""
from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

from duch.pipeline import DuchError

_UNSAFE_GLOBAL = re.compile(r"(?:GLOBAL|global) (\S+)")


def load_tensors(path: str | Path, mmap: bool = False) -> dict:
    """The tensors of a checkpoint file (.safetensors, or a torch.save file loaded with weights_only=True)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise DuchError(f"checkpoint {path}: not a readable safetensors file ({e})") from None
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it may not read before refusing them: noise on top of our line.
            warnings.simplefilter("ignore", UserWarning)
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if not mmap or "mmap" not in str(e):
                    raise
                # The legacy (pre-zip) format cannot be memory-mapped; it is read whole, as safely.
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _UNSAFE_GLOBAL.search(str(e))
        what = f" (it calls for {found.group(1).rstrip('.,')})" if found else ""
        raise DuchError(f"checkpoint {path} holds pickled objects other than tensors{what}; refused: duch loads "
                        "checkpoints as tensors only and never runs code from a file. Use a checkpoint of plain "
                        "tensors (a state dict) or safetensors from a source you trust") from None
    except Exception as e:  # zip errors, truncation, TorchScript archives...: not a tensors-only checkpoint
        raise DuchError(f"checkpoint {path}: not a tensors-only PyTorch checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None


def check_tensors_only(path: str | Path) -> None:
    """Refuse a checkpoint that is not tensors only, before a library loads it by its path. Memory-mapped, so the
    check reads the file's structure, not its gigabytes of weights."""
    path = Path(path)
    if path.suffix in (".npz", ".npy"):
        return  # numpy files: open_clip reads them with np.load, whose allow_pickle is off by default
    load_tensors(path, mmap=True)

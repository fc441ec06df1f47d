"""Training checkpoints without pickle: tensors in a safetensors file, everything else in a JSON file.

A state is any nest of dicts, lists, tuples, numbers, strings and tensors (model and optimizer state dicts,
generator states, loss histories). `split_tensors` lifts every tensor out into a flat {key: tensor} map and
leaves a JSON tree with a reference in its place; `join_tensors` puts them back. Dict keys keep their type (an
optimizer's state is keyed by int) and tuples stay tuples, so a state comes back as it was saved, to the bit.

On disk, in the code length's folder:
    checkpoint-eNNNNN.safetensors   the tensors after epoch NNNNN
    checkpoint.json                 epoch, fingerprint, the JSON tree, and the tensor file's name, size, SHA-256
Both are written under temporary names and renamed; the JSON goes last and names its tensor file, and older
tensor files are removed only after it, so a kill at any point leaves the previous checkpoint whole.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from duch.pipeline.run.artifacts import sha256_file
from duch.pipeline.run.manifest import write_json_atomic
from duch.pipeline.run.storage import atomic_write, fsync_folder

FORMAT = 1
INDEX = "checkpoint.json"
_TENSOR_FILE = re.compile(r"^checkpoint-e\d{5,}\.safetensors$")


def split_tensors(obj, tensors: dict[str, torch.Tensor], path: str = "t"):
    """`obj` as a JSON tree; its tensors go into `tensors` under keys made from their place in the tree."""
    if isinstance(obj, torch.Tensor):
        # A copy: safetensors refuses tensors sharing memory (a scheduler's last lr can be the optimizer's).
        tensors[path] = obj.detach().to("cpu", copy=True).contiguous()
        return {"tensor": path}
    if isinstance(obj, dict):
        return {"dict": [[k, split_tensors(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"tuple": [split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return {"list": [split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"a checkpoint holds tensors, containers, numbers and strings, not {type(obj).__name__}")


def join_tensors(tree, tensors: dict[str, torch.Tensor]):
    """The inverse of split_tensors. Only the node kinds it writes are read: the JSON is data, nothing more."""
    (kind, value), = tree.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {k: join_tensors(v, tensors) for k, v in value}
    if kind == "tuple":
        return tuple(join_tensors(v, tensors) for v in value)
    if kind == "list":
        return [join_tensors(v, tensors) for v in value]
    if kind == "value":
        return value
    raise ValueError(f"unknown checkpoint node {kind!r}")


def save_checkpoint(folder: Path, epoch: int, fingerprint: str, state: dict) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    tree = split_tensors(state, tensors)
    path = folder / f"checkpoint-e{epoch:05d}.safetensors"
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp))
    write_json_atomic(folder / INDEX, {
        "format": FORMAT, "epoch": epoch, "fingerprint": fingerprint,
        "tensors": {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)},
        "state": tree,
    })
    _remove_tensor_files(folder, keep=path.name)
    return path


def load_checkpoint(folder: Path, fingerprint: str) -> tuple[int, dict] | tuple[None, str]:
    """(epoch, state) of the folder's checkpoint, or (None, why there is none to resume from)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / INDEX
    if not index.exists():
        return None, "no checkpoint"
    try:
        meta = json.loads(index.read_text())
        name = meta["tensors"]["file"]
        if meta.get("format") != FORMAT or not isinstance(name, str) or not _TENSOR_FILE.match(name):
            return None, f"{index} is not a checkpoint this duch writes"
        if meta["fingerprint"] != fingerprint:
            return None, "the checkpoint was made with other settings or features"
        path = folder / name
        if not path.is_file() or path.stat().st_size != meta["tensors"]["bytes"] \
                or sha256_file(path) != meta["tensors"]["sha256"]:
            return None, f"{path} is missing or does not match its checksum"
        return int(meta["epoch"]), join_tensors(meta["state"], load_file(str(path)))
    except Exception as e:  # whatever is wrong with it (safetensors' own errors included), it is not resumed
        return None, f"{index} is unreadable ({type(e).__name__}: {e})"


def remove_checkpoint(folder: Path) -> None:
    """Drop a code length's checkpoint once its final outputs are written (or when it is retrained afresh),
    durably: nothing else is written in the folder after it, so a power cut would otherwise bring the checkpoint
    back beside a finished model."""
    folder = Path(folder)
    index = folder / INDEX
    removed = index.exists()
    index.unlink(missing_ok=True)
    if _remove_tensor_files(folder, keep=None) or removed:
        fsync_folder(folder)


def _remove_tensor_files(folder: Path, keep: str | None) -> bool:
    """Whether there was anything to remove."""
    found = [p for p in folder.glob("checkpoint-e*.safetensors") if p.name != keep]
    found += list(folder.glob(".checkpoint-e*.safetensors.*tmp"))  # of a run killed while saving
    for path in found:
        path.unlink(missing_ok=True)
    return bool(found)

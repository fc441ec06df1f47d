"""Stage two's plan and work: what decides the models (`train_plan`: the extract stage's fingerprint and the
output settings), then, once the stage knows it has work to do, the split, and one model per code length, a
finished code length kept and a killed one resumed from its checkpoint (`train_work`)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from duch.data.splits import Split
from duch.pipeline.config import TrainConfig
from duch.pipeline.formats.checkpoint import remove_checkpoint
from duch.pipeline.formats.features import Features
from duch.pipeline.formats.weights import save_weights
from duch.pipeline.retrieval.metrics import DIRECTIONS
from duch.pipeline.run.fingerprint import digest, normalized
from duch.pipeline.run.manifest import library_versions, write_json_atomic
from duch.pipeline.run.stage import StageFolder, StagePlan, finished_part
from duch.pipeline.train.data import TrainData, prepare, with_caption_noise
from duch.pipeline.train.loop import Checkpoints, train_bits
from duch.pipeline.train.report import format_table, write_history

BITS_FILES = ("model.safetensors", "losses.csv", "history.json", "losses.png", "result.json")  # per code length


@dataclass(frozen=True)
class Training:
    """One train-hash stage: the settings (precision resolved), the features, the split, where it trains."""

    cfg: TrainConfig
    features: Features
    split: Split
    device: torch.device

    @property
    def basis(self) -> dict:
        return normalized({"extract": self.features.extract.fingerprint, "settings": self.cfg.output_settings()})


def train_plan(folder: StageFolder, job: Training, force: bool, progress: bool,
               echo: Callable[[str], None]) -> StagePlan:
    """The train-hash stage: up to date while every code length's files are intact; a damaged one is trained
    again (its result.json removed), the others kept."""
    def damaged(path: Path) -> str:
        (path.parent / "result.json").unlink(missing_ok=True)
        return (f"{path} is missing, unlisted or does not match its checksum; training "
                f"{path.parent.name.removeprefix('bits-')} bits again")

    return StagePlan(job.basis, lambda: train_work(folder, job, force, progress, echo),
                     intact=[f"bits-{b}/{n}" for b in job.cfg.bits for n in BITS_FILES], damaged=damaged,
                     report=lambda manifest: report(manifest["results"], job.cfg.map_k, echo))


def report(results: dict, map_k: int, echo: Callable[[str], None], up_to_date: bool = False) -> None:
    """mAP tables of the code lengths validated (the reference definition alone for a stage found up to date)."""
    with_map = {b: r["map"] for b, r in results.items() if r.get("map")}
    if up_to_date:
        echo(format_table(with_map, k=map_k))
    elif with_map:
        echo(format_table(with_map, "reference", map_k))
        echo(format_table(with_map, "textbook", map_k))


def train_work(folder: StageFolder, job: Training, force: bool, progress: bool, echo: Callable[[str], None]) -> dict:
    """split.json, config.json and every code length's files; returns the manifest's fields."""
    cfg, features, split = job.cfg, job.features, job.split
    data, owner = with_caption_noise(prepare(features, job.device), split, cfg)
    swapped = np.flatnonzero(owner != np.arange(len(owner)))
    if len(swapped):
        echo(f"train-hash: caption_noise {cfg.caption_noise}: {len(swapped)} of {len(split.train)} training items "
             "train with another item's captions")
    evaluate = len(split.query) > 0 and (features.labels != "").all()
    eval_rows = features.one_caption_per_image(cfg.split_seed) if evaluate else None
    eval_text = torch.as_tensor(eval_rows, device=job.device) if evaluate else None
    write_json_atomic(folder.path / "split.json", {
        "mode": cfg.split, "seed": cfg.split_seed,
        **{name: features.ids[getattr(split, name)].tolist() for name in ("train", "query", "database")},
        "eval_caption": None if eval_rows is None else [
            [str(features.text_image_id[r]), int(features.text_caption_index[r])] for r in eval_rows],
        **({"captions_swapped": [[str(features.ids[i]), str(features.ids[owner[i]])] for i in swapped]}
           if len(swapped) else {}),
    })
    write_json_atomic(folder.path / "config.json", dataclasses.asdict(cfg))
    results = {str(bits): code_length(folder.path / f"bits-{bits}", bits, job, data, eval_text, force, progress,
                                      echo) for bits in cfg.bits}  # the manifest's keys, as JSON keeps them
    return dict(
        config=dataclasses.asdict(cfg), device=str(job.device), versions=library_versions(),
        split={"mode": cfg.split, "train": len(split.train), "query": len(split.query),
               "database": len(split.database), **({"captions_swapped": len(swapped)} if len(swapped) else {})},
        results=results, outputs=[f"bits-{bits}/{name}" for bits in cfg.bits for name in BITS_FILES])


def code_length(out: Path, bits: int, job: Training, data: TrainData, eval_text: torch.Tensor | None, force: bool,
                progress: bool, echo: Callable[[str], None]) -> dict:
    """One code length's model, losses, history and result.json (written last), or those of an earlier attempt
    with the same settings, kept; returns its result."""
    cfg, features = job.cfg, job.features
    fingerprint = digest({**job.basis, "bits": bits})
    kept = finished_part(out / "result.json", fingerprint, [out / n for n in BITS_FILES], force)
    if kept:
        echo(f"train-hash: {bits} bits already trained, kept")
        remove_checkpoint(out)  # left by a kill between result.json and its removal
        return kept
    if force:
        remove_checkpoint(out)
    run = train_bits(bits, cfg, data, job.split, eval_text, features.labels, progress,
                     checkpoints=Checkpoints(out, fingerprint, echo))
    save_weights(out / "model.safetensors", run.heads, run.disc,
                 {"bits": bits, "hidden": cfg.hidden, "image_dim": data.image.shape[1], "text_dim": data.text.shape[1],
                  "extract_fingerprint": features.extract.fingerprint})
    write_history(out, run.history, run.evals, bits)
    final = run.evals[-1]["map"] if run.evals else None
    result = {"fingerprint": fingerprint, "bits": bits, "seconds": round(run.seconds, 2), "map": final,
              "map_adaptive": run.evals[-1].get("map_adaptive") if final else None, "final_losses": run.history[-1]}
    write_json_atomic(out / "result.json", result)
    remove_checkpoint(out)  # after result.json: a kill before it still finds the checkpoint
    echo(f"train-hash: {bits} bits in {run.seconds:.1f} s"
         + (f"; mAP@{cfg.map_k} " + ", ".join(f"{d} {final[d]['reference']:.3f}" for d in DIRECTIONS)
            if final else ""))
    return result

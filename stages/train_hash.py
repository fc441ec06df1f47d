"""Stage 2: DUCH's hashing heads trained from the cached features, one model per code length.

Per epoch: every training item gets fresh views (one of its cached augmented image views, two of its captions;
seeded), its binary target B = sign(sum of its four continuous codes) is refreshed, then for each batch one
discriminator step and one head step on L = contrastive + alpha adversarial + beta quantization + gamma balance
(pipeline/train/). A finished code length is kept on rerun; a killed one resumes from its last checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import numpy as np
import torch

from duch.pipeline.compute.device import resolve_device, resolve_precision
from duch.pipeline.config import TrainConfig
from duch.pipeline.formats.checkpoint import remove_checkpoint
from duch.pipeline.formats.features import load_features
from duch.pipeline.formats.weights import save_weights
from duch.pipeline.retrieval.metrics import DIRECTIONS
from duch.pipeline.run.fingerprint import digest
from duch.pipeline.run.manifest import library_versions, write_json_atomic
from duch.pipeline.run.stage import StageFolder, StageResult, stage
from duch.pipeline.run.storage import make_folders, write_errors
from duch.pipeline.train.data import check_features, choose_split, prepare, with_caption_noise
from duch.pipeline.train.loop import Checkpoints, train_bits
from duch.pipeline.train.report import format_table, write_history

STAGE = "train-hash"
BITS_FILES = ("model.safetensors", "losses.csv", "history.json", "losses.png", "result.json")  # per code length


@stage(STAGE)
def train_hash(cfg: TrainConfig, force: bool, progress: bool, echo: Callable[[str], None]) -> StageResult:
    features = load_features(cfg.run)
    check_features(features)
    split = choose_split(features, cfg)
    folder = StageFolder(cfg.run, STAGE)
    out_dir = folder.path
    device = resolve_device(cfg.device)
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))
    basis = json.loads(json.dumps({"extract": features.manifest["fingerprint"], "settings": cfg.output_settings()}))
    done, damaged = folder.check(digest(basis), force, [f"bits-{b}/{n}" for b in cfg.bits for n in BITS_FILES])
    if done:
        echo(f"train-hash: up to date in {out_dir}; nothing to do (--force redoes it)")
        echo(format_table({b: r["map"] for b, r in done["results"].items() if r.get("map")}, k=cfg.map_k))
        return StageResult(out_dir, done, did_work=False)
    for path in damaged:  # its code length is trained again below; the others are kept
        echo(f"train-hash: {path} is missing, unlisted or does not match its checksum; training "
             f"{path.parent.name.removeprefix('bits-')} bits again")
        (path.parent / "result.json").unlink(missing_ok=True)
    folder.start()

    data, owner = with_caption_noise(prepare(features, device), split, cfg)
    swapped = np.flatnonzero(owner != np.arange(len(owner)))
    if len(swapped):
        echo(f"train-hash: caption_noise {cfg.caption_noise}: {len(swapped)} of {len(split.train)} training items "
             "train with another item's captions")
    evaluate = len(split.query) > 0 and (features.labels != "").all()
    eval_rows = features.one_caption_per_image(cfg.split_seed) if evaluate else None
    eval_text = torch.as_tensor(eval_rows, device=device) if evaluate else None
    write_json_atomic(out_dir / "split.json", {
        "mode": cfg.split, "seed": cfg.split_seed,
        **{name: features.ids[getattr(split, name)].tolist() for name in ("train", "query", "database")},
        "eval_caption": None if eval_rows is None else [
            [str(features.text_image_id[r]), int(features.text_caption_index[r])] for r in eval_rows],
        **({"captions_swapped": [[str(features.ids[i]), str(features.ids[owner[i]])] for i in swapped]}
           if len(swapped) else {}),
    })
    write_json_atomic(out_dir / "config.json", dataclasses.asdict(cfg))
    results, outputs = {}, []
    for bits in cfg.bits:
        bits_folder = out_dir / f"bits-{bits}"
        bits_fingerprint = digest({**basis, "bits": bits})
        finished = bits_folder / "result.json"
        kept = json.loads(finished.read_text()) if finished.exists() and not force else None
        if kept and kept.get("fingerprint") == bits_fingerprint and all((bits_folder / n).is_file()
                                                                       for n in BITS_FILES):
            echo(f"train-hash: {bits} bits already trained, kept")
            results[str(bits)] = kept
            remove_checkpoint(bits_folder)  # left by a kill between result.json and its removal
        else:
            with write_errors(bits_folder):
                make_folders(bits_folder)
                finished.unlink(missing_ok=True)
            if force:
                remove_checkpoint(bits_folder)
            run = train_bits(bits, cfg, data, split, eval_text, features.labels, progress,
                             checkpoints=Checkpoints(bits_folder, bits_fingerprint, echo))
            save_weights(bits_folder / "model.safetensors", run["heads"], run["disc"],
                         {"bits": bits, "hidden": cfg.hidden, "image_dim": data.image.shape[1],
                          "text_dim": data.text.shape[1], "extract_fingerprint": features.manifest["fingerprint"]})
            write_history(bits_folder, run["history"], run["evals"], bits)
            final = run["evals"][-1]["map"] if run["evals"] else None
            results[str(bits)] = {"fingerprint": bits_fingerprint, "bits": bits, "seconds": round(run["seconds"], 2),
                                  "map": final, "map_adaptive": run["evals"][-1].get("map_adaptive") if final else None,
                                  "final_losses": run["history"][-1]}
            write_json_atomic(finished, results[str(bits)])
            remove_checkpoint(bits_folder)  # after result.json: a kill before it still finds the checkpoint
            echo(f"train-hash: {bits} bits in {run['seconds']:.1f} s"
                 + (f"; mAP@{cfg.map_k} " + ", ".join(f"{d} {final[d]['reference']:.3f}" for d in DIRECTIONS)
                    if final else ""))
        outputs += [folder.output(f"bits-{bits}/{name}") for name in BITS_FILES]
    manifest = folder.finish(
        fingerprint=digest(basis), basis=basis, config=dataclasses.asdict(cfg), device=str(device),
        versions=library_versions(),
        split={"mode": cfg.split, "train": len(split.train), "query": len(split.query),
               "database": len(split.database), **({"captions_swapped": len(swapped)} if len(swapped) else {})},
        results=results, outputs=outputs,
    )
    with_map = {b: r["map"] for b, r in results.items() if r.get("map")}
    if with_map:
        echo(format_table(with_map, "reference", cfg.map_k))
        echo(format_table(with_map, "textbook", cfg.map_k))
    return StageResult(out_dir, manifest, did_work=True)

"""The evaluate stage's plan and work: retrieval quality of an encoded run on its own held-out split, in the
published tables' terms (evaluation.py), written as metrics.json, table.md and the plots (report.py).

Up to date (nothing redone) while the codes, the settings, the code lengths and the archive's generation are
those it was made from and its files are intact; the codes are checked against their manifests either way.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from duch.pipeline import DuchError
from duch.pipeline.archive.generation import read_generation
from duch.pipeline.archive.segments import ArchiveCodes, open_archive_codes
from duch.pipeline.config import EvaluateConfig
from duch.pipeline.retrieval.evaluation import class_metrics, gather, instance_metrics, live_split, p_at_k_grid
from duch.pipeline.retrieval.report import format_tables, plot_curves
from duch.pipeline.run.fingerprint import digest
from duch.pipeline.run.layout import stage_dir
from duch.pipeline.run.manifest import library_versions, write_json_atomic
from duch.pipeline.run.records import EncodedRun, TrainRun
from duch.pipeline.run.stage import StageFolder, StagePlan
from duch.pipeline.run.storage import atomic_write

STAGE = "evaluate"


def evaluate_plan(cfg: EvaluateConfig) -> tuple[StageFolder, StagePlan]:
    """The evaluate stage of `cfg.run` and its plan, after the checks that the codes are this run's model's."""
    run = Path(cfg.run)
    t0 = time.perf_counter()
    model_run, encoded = TrainRun.read(run), EncodedRun.read(run)
    split = json.loads((stage_dir(run, "train-hash") / "split.json").read_text())
    if not split["query"]:
        raise DuchError(f"{run} was trained with `split` all: there is no held-out query set to evaluate on")
    if encoded.views != model_run.archive_views(model_run.extract):
        # The same weights under another view_ensemble setting: the codes follow the rule they were made by.
        made = f"averaged over {encoded.views} augmented views" if encoded.views else "from the images alone"
        raise DuchError(f"{encoded.folder}: the image codes were made {made}, but the model's view_ensemble setting "
                        "codes images otherwise; run the encode-archive stage on it first")
    bits_list = list(cfg.bits or encoded.bits)
    for bits in bits_list:
        model, made_by = model_run.models.get(bits), encoded.models.get(bits)
        if model is None or made_by is None or made_by.sha256 != model.sha256 \
                or encoded.archive_fingerprint != model_run.extract.fingerprint:
            raise DuchError(f"{encoded.folder}: the {bits}-bit codes were not made by this run's model from this "
                            "run's archive; run the encode-archive stage on it first")
    # Opened (and so checked against their manifests) whether or not the metrics are up to date: damaged codes are
    # refused either way.
    archives = {bits: open_archive_codes(run, bits) for bits in bits_list}
    folder = StageFolder(run, STAGE)
    # What decides the metrics: the codes, the settings, the code lengths asked for and the archive's generation
    # (items removed or added since). The last two only where they differ from a plain run's, whose fingerprint
    # is the one evaluate has always recorded.
    generation = read_generation(run).number
    chosen = {**({"bits": list(cfg.bits)} if cfg.bits else {}), **({"generation": generation} if generation else {})}
    settings = {"k": cfg.k, "rerank": cfg.rerank}
    return folder, StagePlan(
        {"codes": encoded.fingerprint, "settings": {**settings, **chosen}},
        lambda: evaluation(cfg, run, split, archives, encoded.views, t0, folder), fingerprint=digest(
            {"codes": encoded.fingerprint, **settings, **chosen}))


def evaluation(cfg: EvaluateConfig, run: Path, split: dict, archives: dict[int, ArchiveCodes], image_views: int,
               t0: float, folder: StageFolder) -> dict:
    """The work: every code length's class- and instance-level figures on the held-out split, metrics.json,
    table.md and the plots; returns the manifest's fields."""
    results = {}
    for bits, archive in archives.items():
        tables = archive.tables
        if "text" not in tables:
            raise DuchError(f"{run}: the archive has no captions; evaluate needs image-caption pairs")
        split = live_split(split, tables, archive.removed)
        sides = gather(tables, split, run, archive.removed)
        labelled = all(str(label) for label in sides["query"]["I"].labels) and all(
            str(label) for label in sides["database"]["I"].labels)
        n_db = len(split["database"])
        results[str(bits)] = {  # metrics.json's keys, as JSON keeps them
            "class": class_metrics(sides, bits, cfg.k, cfg.rerank, p_at_k_grid(n_db)) if labelled else None,
            "instance": instance_metrics(sides, cfg.rerank),
        }
    instance_label = (f"{split['mode']} split's {'test' if split['mode'] == 'dataset' else 'query'} items: "
                      f"{len(split['query'])} images and their captions")
    table = format_tables(results, cfg.k, split, instance_label, image_views)
    metrics = {"k": cfg.k, "rerank": cfg.rerank, "split": {s: len(split[s]) for s in ("train", "query", "database")},
               "split_mode": split["mode"], "instance_items": instance_label, "image_views_averaged": image_views,
               "tie_break": "database order", "results": results}
    write_json_atomic(folder.path / "metrics.json", metrics)
    with atomic_write(folder.path / "table.md") as tmp:
        tmp.write_text(table + "\n")
    plots = plot_curves(folder.path, results)
    return dict(config=dataclasses.asdict(cfg), versions=library_versions(),
                outputs=["metrics.json", "table.md", *(p.name for p in plots)],
                timings={"total_s": round(time.perf_counter() - t0, 3)})

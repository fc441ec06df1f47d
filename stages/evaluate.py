"""`evaluate`: retrieval quality of an encoded run on its own held-out split, in the published tables' terms
(pipeline/retrieval/evaluation.py); metrics.json, table.md and the plots (pipeline/retrieval/report.py).
Always redone: it is cheap, and its inputs are checked against their manifests."""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from duch.pipeline import DuchError
from duch.pipeline.archive.segments import open_archive_codes
from duch.pipeline.config import EvaluateConfig
from duch.pipeline.model.trained import archive_views, image_code, load_model_run
from duch.pipeline.retrieval.evaluation import class_metrics, gather, instance_metrics, live_split, p_at_k_grid
from duch.pipeline.retrieval.report import format_tables, plot_curves
from duch.pipeline.retrieval.search import load_encode_manifest
from duch.pipeline.run.fingerprint import digest
from duch.pipeline.run.layout import stage_dir
from duch.pipeline.run.manifest import library_versions, write_json_atomic
from duch.pipeline.run.stage import StageFolder, StageResult, stage
from duch.pipeline.run.storage import atomic_write

STAGE = "evaluate"


@dataclass
class EvaluateResult(StageResult):
    metrics: dict = dataclasses.field(default_factory=dict)
    table: str = ""
    plots: list[Path] = dataclasses.field(default_factory=list)


@stage(STAGE)
def evaluate(cfg: EvaluateConfig, force: bool, progress: bool, echo: Callable[[str], None]) -> EvaluateResult:
    run = Path(cfg.run)
    t0 = time.perf_counter()
    model_run = load_model_run(run)
    codes_dir, encoded = load_encode_manifest(run)
    split_path = stage_dir(run, "train-hash") / "split.json"
    split = json.loads(split_path.read_text())
    if not split["query"]:
        raise DuchError(f"{run} was trained with --split all: there is no held-out query set to evaluate on")
    image_views = int(image_code(encoded)["views"])
    if image_views != archive_views(model_run, model_run.extract):
        # The same weights under another view_ensemble setting: the codes follow the rule they were made by.
        made = f"averaged over {image_views} augmented views" if image_views else "from the images alone"
        raise DuchError(f"{codes_dir}: the image codes were made {made}, but the model's view_ensemble setting "
                        f"codes images otherwise; run `duch encode-archive --run {run}` first")
    bits_list = list(cfg.bits or [int(b) for b in encoded["models"]])
    results = {}
    for bits in bits_list:
        model = model_run.models.get(bits)
        made_by = encoded["models"].get(str(bits), {}).get("sha256")
        if model is None or made_by != model.sha256 or encoded["basis"]["archive"] != model_run.extract["fingerprint"]:
            raise DuchError(f"{codes_dir}: the {bits}-bit codes were not made by this run's model from this run's "
                            f"archive; run `duch encode-archive --run {run}` first")
        archive = open_archive_codes(run, bits)
        tables = archive.tables
        if "text" not in tables:
            raise DuchError(f"{run}: the archive has no captions; evaluate needs image-caption pairs")
        split = live_split(split, tables, archive.removed)
        sides = gather(tables, split, run, archive.removed)
        labelled = all(str(label) for label in sides["query"]["I"].labels) and all(
            str(label) for label in sides["database"]["I"].labels)
        n_db = len(split["database"])
        results[str(bits)] = {
            "class": class_metrics(sides, bits, cfg.k, cfg.rerank, p_at_k_grid(n_db)) if labelled else None,
            "instance": instance_metrics(sides, cfg.rerank),
        }
    instance_label = (f"{split['mode']} split's {'test' if split['mode'] == 'dataset' else 'query'} items: "
                      f"{len(split['query'])} images and their captions")
    table = format_tables(results, cfg.k, split, instance_label, image_views)
    folder = StageFolder(run, STAGE)
    folder.start()
    metrics = {"k": cfg.k, "rerank": cfg.rerank, "split": {s: len(split[s]) for s in ("train", "query", "database")},
               "split_mode": split["mode"], "instance_items": instance_label, "image_views_averaged": image_views,
               "tie_break": "database order", "results": results}
    write_json_atomic(folder.path / "metrics.json", metrics)
    with atomic_write(folder.path / "table.md") as tmp:
        tmp.write_text(table + "\n")
    plots = plot_curves(folder.path, results)
    manifest = folder.finish(
        config=dataclasses.asdict(cfg), versions=library_versions(),
        basis={"codes": encoded["fingerprint"], "settings": {"k": cfg.k, "rerank": cfg.rerank}},
        fingerprint=digest({"codes": encoded["fingerprint"], "k": cfg.k, "rerank": cfg.rerank}),
        outputs=[folder.output(name) for name in ("metrics.json", "table.md", *(p.name for p in plots))],
        timings={"total_s": round(time.perf_counter() - t0, 3)},
    )
    echo(table)
    echo(f"evaluate: metrics in {folder.path / 'metrics.json'}; plots: {', '.join(str(p) for p in plots) or 'none'}")
    return EvaluateResult(folder.path, manifest, True, metrics, table, plots)

"""`evaluate`: retrieval quality of an encoded run on its own held-out split, in the published tables' terms;
metrics.json, table.md and the plots (its plan and work: pipeline/retrieval/quality.py). A rerun with the same
codes and settings finds it up to date and shows the table again."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from duch.pipeline.config import EvaluateConfig
from duch.pipeline.retrieval.quality import STAGE, evaluate_plan
from duch.pipeline.run.stage import StageResult, stage


@dataclass
class EvaluateResult(StageResult):
    metrics: dict = dataclasses.field(default_factory=dict)
    table: str = ""
    plots: list[Path] = dataclasses.field(default_factory=list)


@stage(STAGE)
def evaluate(cfg: EvaluateConfig, force: bool, progress: bool, echo: Callable[[str], None]) -> EvaluateResult:
    folder, plan = evaluate_plan(cfg)
    result = folder.run(plan, force, echo)
    metrics = json.loads((folder.path / "metrics.json").read_text())
    table = (folder.path / "table.md").read_text().removesuffix("\n")
    plots = [folder.path / o["file"] for o in result.manifest["outputs"] if o["file"].endswith(".png")]
    echo(table)
    if result.did_work:
        echo(f"evaluate: metrics in {folder.path / 'metrics.json'}; plots: "
             f"{', '.join(str(p) for p in plots) or 'none'}")
    return EvaluateResult(folder.path, result.manifest, result.did_work, metrics, table, plots)

"""Stage 2: DUCH's hashing heads trained from the cached features, one model per code length.

Per epoch: every training item gets fresh views (one of its cached augmented image views, two of its captions;
seeded), its binary target B = sign(sum of its four continuous codes) is refreshed, then for each batch one
discriminator step and one head step on L = contrastive + alpha adversarial + beta quantization + gamma balance
(pipeline/train/). A finished code length is kept on rerun; a killed one resumes from its last checkpoint.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from duch.pipeline.compute.device import resolve_device, resolve_precision
from duch.pipeline.config import TrainConfig
from duch.pipeline.formats.features import load_features
from duch.pipeline.run.stage import StageFolder, StageResult, stage
from duch.pipeline.train.data import check_features, choose_split
from duch.pipeline.train.work import Training, report, train_plan

STAGE = "train-hash"


@stage(STAGE)
def train_hash(cfg: TrainConfig, force: bool, progress: bool, echo: Callable[[str], None]) -> StageResult:
    features = load_features(cfg.run)
    check_features(features)
    split = choose_split(features, cfg)
    folder = StageFolder(cfg.run, STAGE)
    device = resolve_device(cfg.device)
    job = Training(dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device)), features, split,
                   device)
    result = folder.run(train_plan(folder, job, force, progress, echo), force, echo)
    if not result.did_work:
        report(result.manifest["results"], cfg.map_k, echo, up_to_date=True)
    return result

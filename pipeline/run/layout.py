"""A run directory holds one folder per stage; each stage folder ends with its manifest.json."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from duch.pipeline.run.storage import make_folders

STAGES = ("extract", "train-hash", "encode-archive", "evaluate")


def stage_dir(run: str | os.PathLike, stage: str) -> Path:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    return Path(run) / stage


def clear_stage(path: Path) -> None:
    """Empty a stage folder for --force: the manifest goes first, so a crash midway never looks finished."""
    manifest = path / "manifest.json"
    if manifest.exists():
        manifest.unlink()
    if path.exists():
        shutil.rmtree(path)
    make_folders(path)

"""Helpers shared by the benchmark scripts: machine naming and result files."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine_name() -> str:
    import torch

    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0).replace("NVIDIA ", "").replace(" ", "-")
        return f"{gpu}-{os.cpu_count()}cpu"
    return f"cpu{os.cpu_count()}-{platform.machine()}"


def save(kind: str, payload: dict) -> Path:
    from pipeline.manifest import library_versions

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.date.today().isoformat()
    path = RESULTS / f"{kind}-{machine_name()}-{stamp}.json"
    payload = {"benchmark": kind, "machine": machine_name(), "date": stamp, "versions": library_versions(), **payload}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path

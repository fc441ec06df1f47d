"""Helpers shared by the benchmark scripts: machine naming, result files, the UCM data and its subsets."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# The UCM-captions data beside the checkout (../shared/datasets/ucm), as the README lays the folders out.
UCM = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ucm"


def rss_mb(field: str = "VmRSS:") -> float:
    """This process's resident memory in MB from /proc/self/status: "VmRSS:" now, "VmHWM:" its peak."""
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    """Set the peak (VmHWM) to the current RSS, so a later peak is the work's, not the imports' (Linux)."""
    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pass


def log(msg: str) -> None:
    print(msg, flush=True)


def ucm_subset(ucm: Path, n: int, folder: Path) -> Path:
    """n UCM tiles spread over the 21 classes (every k-th entry), copied with their captions into folder."""
    entries = json.loads((ucm / "dataset_ucm.json").read_text())["images"]
    chosen = entries[::max(1, len(entries) // n)][:n]
    (folder / "images").mkdir(parents=True)
    for entry in chosen:
        shutil.copy(ucm / "images" / entry["filename"], folder / "images" / entry["filename"])
    (folder / "dataset_ucm.json").write_text(json.dumps({"dataset": "ucm", "images": chosen}))
    return folder


def cli_pair(cli: str, before: str | None) -> dict[str, str]:
    """The duch CLIs measured side by side: {"before": older cli.py, "after": this one}, before first."""
    clis = {"after": str(Path(cli).resolve())}
    return {"before": str(Path(before).resolve()), **clis} if before else clis


def machine_name() -> str:
    import torch

    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0).replace("NVIDIA ", "").replace(" ", "-")
        return f"{gpu}-{os.cpu_count()}cpu"
    return f"cpu{os.cpu_count()}-{platform.machine()}"


def new_result_path(stem: str) -> Path:
    """RESULTS/stem.json, or stem-2.json, -3... when a run of the same day already saved it: docs/results.md cites
    result files by name, so a rerun never replaces one."""
    path, n = RESULTS / f"{stem}.json", 2
    while path.exists():
        path, n = RESULTS / f"{stem}-{n}.json", n + 1
    return path


def save(kind: str, payload: dict) -> Path:
    from duch.pipeline.run.manifest import library_versions

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.date.today().isoformat()
    path = new_result_path(f"{kind}-{machine_name()}-{stamp}")
    payload = {"benchmark": kind, "machine": machine_name(), "date": stamp, "versions": library_versions(), **payload}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def parse_seeds(text: str) -> list[int]:
    """"0,1,2", "0-9" or a mix ("0-2,7") -> the seeds in the order given."""
    seeds = []
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        try:
            seeds += list(range(int(first), int(last) + 1)) if sep else [int(first)]
        except ValueError:
            raise SystemExit(f"--seeds {text!r}: give whole numbers and ranges, e.g. 0,1,2 or 0-9") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds {text!r}: give at least one seed, each once")
    return seeds

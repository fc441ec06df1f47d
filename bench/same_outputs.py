"""Are two run directories the same outputs? For a change meant to leave behaviour unchanged (a refactor): run the
main job with the code before and after, then

    python bench/same_outputs.py runs/before runs/after

compares every HDF5 file (shards, code files) dataset by dataset and attribute by attribute, the JSON outputs
(metrics, splits, results) field by field, every manifest's fingerprint and fields, and the other files byte for
byte. Timings, creation times, library versions and the paths a run was made from are expected to differ and
are listed apart, never counted as a difference. Prints a table; saves JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import save  # noqa: E402

# Fields that say when, where and how fast a run was made, not what it made.
VOLATILE = {"created", "timings", "versions", "seconds", "total_s", "execution", "device", "run", "data",
            "source", "images_dir", "archive_run", "model_run", "image_decode"}
# Files whose bytes hold a plot's rendering (matplotlib stamps nothing, but fonts may differ by machine).
PLOTS = (".png",)


def h5_differences(a: Path, b: Path) -> list[str]:
    out: list[str] = []
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        def walk(ga, gb, prefix):
            for key in sorted(set(ga.attrs) | set(gb.attrs)):
                va, vb = ga.attrs.get(key), gb.attrs.get(key)
                if key not in VOLATILE and not np.array_equal(np.asarray(va), np.asarray(vb)):
                    out.append(f"{prefix}@{key}")
            for key in sorted(set(ga) | set(gb)):
                if key not in ga or key not in gb:
                    out.append(f"{prefix}/{key} only on one side")
                elif isinstance(ga[key], h5py.Group):
                    walk(ga[key], gb[key], f"{prefix}/{key}")
                elif ga[key].dtype != gb[key].dtype or not np.array_equal(ga[key][()], gb[key][()]):
                    out.append(f"{prefix}/{key}")
        walk(fa, fb, "")
    return out


def json_differences(a, b, prefix: str = "") -> tuple[list[str], list[str]]:
    """(differences, volatile fields that differ) between two JSON values."""
    if isinstance(a, dict) and isinstance(b, dict):
        diffs, volatile = [], []
        for key in sorted(set(a) | set(b)):
            where = f"{prefix}.{key}" if prefix else key
            if key in VOLATILE:
                if a.get(key) != b.get(key):
                    volatile.append(where)
                continue
            d, v = json_differences(a.get(key), b.get(key), where)
            diffs += d
            volatile += v
        return diffs, volatile
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        diffs, volatile = [], []
        for i, (x, y) in enumerate(zip(a, b)):
            d, v = json_differences(x, y, f"{prefix}[{i}]")
            diffs += d
            volatile += v
        return diffs, volatile
    return ([] if a == b else [prefix or "(value)"]), []


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare(before: Path, after: Path) -> dict:
    files = sorted({p.relative_to(before) for p in before.rglob("*") if p.is_file()}
                   | {p.relative_to(after) for p in after.rglob("*") if p.is_file()})
    report = {}
    for rel in files:
        a, b = before / rel, after / rel
        if rel.parts[0] == "serve" or rel.name == ".duch.lock":
            continue
        if not a.exists() or not b.exists():
            report[str(rel)] = {"same": False, "differences": ["only in " + ("after" if b.exists() else "before")]}
        elif rel.suffix == ".h5":
            diffs = h5_differences(a, b)
            report[str(rel)] = {"same": not diffs, "differences": diffs}
        elif rel.suffix == ".json":
            diffs, volatile = json_differences(json.loads(a.read_text()), json.loads(b.read_text()))
            report[str(rel)] = {"same": not diffs, "differences": diffs, "volatile": volatile}
        elif rel.suffix in PLOTS:
            report[str(rel)] = {"same": True, "bytes_equal": sha(a) == sha(b), "differences": []}
        else:
            same = sha(a) == sha(b)
            report[str(rel)] = {"same": same, "differences": [] if same else ["bytes"]}
    for rel in files:
        if rel.name == "manifest.json" and str(rel) in report:
            excuse_checksums(report, rel, json.loads((after / rel).read_text()) if (after / rel).exists() else {})
    return report


def excuse_checksums(report: dict, manifest: Path, listed: dict) -> None:
    """A manifest's size and checksum of an output whose own differences are all volatile (a result.json whose
    seconds differ) are volatile too."""
    row = report[str(manifest)]
    outputs = listed.get("outputs") if isinstance(listed.get("outputs"), list) else []
    kept = []
    for where in row["differences"]:
        head, _, field = where.rpartition(".")
        index = head.removeprefix("outputs[").removesuffix("]")
        entry = outputs[int(index)] if head.startswith("outputs[") and index.isdigit() and int(index) < len(
            outputs) else None
        output = report.get(str(manifest.parent / entry["file"])) if isinstance(entry, dict) else None
        if field in ("bytes", "sha256") and output and output["same"] and output.get("volatile"):
            row.setdefault("volatile", []).append(where)
        else:
            kept.append(where)
    row["differences"], row["same"] = kept, not kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    report = compare(args.before, args.after)
    width = max(len(f) for f in report)
    print(f"{'file':<{width}}  same  differences (volatile fields that differ, not counted)")
    for name, row in report.items():
        extra = f" ({', '.join(row.get('volatile', []))})" if row.get("volatile") else ""
        print(f"{name:<{width}}  {'yes' if row['same'] else 'NO ':<4}  {', '.join(row['differences'][:6])}{extra}")
    different = [name for name, row in report.items() if not row["same"]]
    print(f"\n{len(report) - len(different)} of {len(report)} files the same"
          + (f"; different: {', '.join(different)}" if different else ""))
    path = save("same_outputs", {"before": str(args.before), "after": str(args.after), "files": report,
                                 "different": different})
    print(f"saved {path}")


if __name__ == "__main__":
    main()

"""Simulated power cuts: does a stage's rerun after a cut anywhere end with the outputs of an uninterrupted run,
and does a finished stage survive one?

    python bench/power_cut.py                                   # this checkout, 20 cuts per stage
    python bench/power_cut.py --before ../before/cli.py         # and an older duch, the same cuts' kinds

Per stage (extract, train-hash, encode-archive; each from the finished stages before it, made by the same CLI,
on a UCM subset with the default encoders), on a fresh copy of the run's folder each time:
1. an uninterrupted run, untraced: which output files two runs make byte-equal (result.json holds timings);
2. the same run under strace (bench/crashfs.py), replayed into a model file system that must end in the state
   the run left on disk;
3. cuts: after the last call (the stage finished: it must survive), right after renames of finished files
   (before their folder's fsync), and at random calls; every other cut is torn (files written since their last
   fsync come back cut short or zero-filled instead of empty);
4. for each cut: the folder as the model says a power cut leaves it, the same command rerun on it, and checks:
   exit 0, the stage folder holding the reference's files, byte-equal where two runs agree, the same manifest
   fingerprint and outputs, the earlier stages untouched (the rerun equals an uninterrupted run); and at the
   last cut, whether the rerun finds the stage up to date (the finished stage survived). Also counted: finished
   files the process had published (renamed under their names) that the cut took away.
Writes bench/results/power_cut-<machine>-<date>.json.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import UCM, cli_pair, log, save, ucm_subset  # noqa: E402
from bench.crashfs import Replay, materialize, read_trace, traced, tree_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("extract", "train-hash", "encode-archive")
RUN = "run"  # the run's folder inside the modelled folder
# Temporary names, duch's (`.NAME.*.tmp`, any version) and safetensors' own: never counted as finished files.
TEMPORARIES = (".*.tmp", ".tmp??????")




def stage_args(stage: str, data: Path, run: Path, shard_size: int) -> list[str]:
    common = ["--run", str(run), "--device", "cpu", "--no-progress"]
    if stage == "extract":
        return ["extract", "--data", str(data), "--shard-size", str(shard_size), "--workers", "0", *common]
    if stage == "train-hash":
        return ["train-hash", "--bits", "16", "--epochs", "4", "--checkpoint-every", "1", "--eval-every", "2",
                "--split", "all", *common]
    return ["encode-archive", "--continuous", *common]


# -------------------------------------------------------------------------------------------- the checks
def is_temporary(rel: str) -> bool:
    """A writer's temporary (duch's or safetensors'), never a finished file."""
    return any(fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], pattern) for pattern in TEMPORARIES)


def under(tree: dict, folder: str) -> dict:
    return {rel: data for rel, data in tree.items() if rel.startswith(folder + "/")}


def published_lost(durable: dict, volatile: dict, folder: str) -> list[str]:
    """Files under their final names in `folder` when the cut came (the process had renamed them into place)
    that the cut took away or left other than they were."""
    return sorted(rel for rel, data in under(volatile, folder).items()
                  if data is not None and not is_temporary(rel) and durable.get(rel) != data)


def deterministic(a: dict, b: dict, folder: str) -> set[str]:
    """The files of `folder` two uninterrupted runs made byte-equal."""
    return {rel for rel, data in under(a, folder).items() if data is not None and b.get(rel) == data}


def compare(after: dict, reference: dict, same: set[str], folder: str, inputs: dict) -> list[str]:
    """What differs between a rerun's folder and the uninterrupted run's, in words ([]: nothing)."""
    problems = []
    names, expected = set(under(after, folder)), set(under(reference, folder))
    if names != expected:
        problems.append(f"files: extra {sorted(names - expected)[:5]}, missing {sorted(expected - names)[:5]}")
    problems += [f"{rel} differs" for rel in sorted(same) if after.get(rel) != reference[rel]]
    manifest = f"{folder}/manifest.json"
    if manifest in after and manifest in reference:
        got, want = json.loads(after[manifest]), json.loads(reference[manifest])
        if got.get("fingerprint") != want.get("fingerprint"):
            problems.append("manifest fingerprint differs")
        listed = {o["file"]: o for o in got.get("outputs", [])}
        for out in want.get("outputs", []):
            mine = listed.get(out["file"])
            if mine is None or (f"{folder}/{out['file']}" in same and mine != out):
                problems.append(f"manifest entry of {out['file']} differs")
    changed = [rel for rel, data in inputs.items() if not rel.endswith(".duch.lock") and after.get(rel) != data]
    if changed:
        problems.append(f"earlier stages changed: {changed[:5]}")
    return problems


def cut_points(events: list, n_calls: int, n: int, folder: str, rng: random.Random) -> dict:
    """{cut: None, or a Random for a torn cut}: after the last call; right after renames into `folder` (before
    the fsync of the folder that makes them durable); at random calls that touched the modelled folder."""
    cuts = [n_calls]
    renames = [e.index + 1 for e in events if e.kind == "rename" and e.to.startswith(folder + "/")
               and not is_temporary(e.to)]
    rng.shuffle(renames)
    cuts += renames[: max(1, (n - 1) // 3)]
    others = sorted({e.index + 1 for e in events} - set(cuts))
    cuts += rng.sample(others, min(len(others), n - len(cuts)))
    return {cut: (random.Random(rng.random()) if k % 2 else None) for k, cut in enumerate(sorted(cuts, reverse=True))}


# ---------------------------------------------------------------------------------------------- the bench
def run_cli(cli: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, cli, *args], capture_output=True, text=True, cwd=ROOT)


def check_stage(cli: str, stage: str, data: Path, work: Path, n_cuts: int, shard_size: int, rng: random.Random
                ) -> dict:
    fs = work / "fs"  # the modelled folder: every run of this stage happens at this one path
    run = fs / RUN
    if fs.exists():
        shutil.rmtree(fs)
    fs.mkdir(parents=True)
    for before in STAGES[: STAGES.index(stage)]:
        done = run_cli(cli, stage_args(before, data, run, shard_size))
        if done.returncode:
            raise SystemExit(f"{before}: {done.stdout}{done.stderr}")
    initial = tree_of(fs)
    inputs = {rel: d for rel, d in initial.items() if not rel.startswith(f"{RUN}/{stage}/")}
    args = stage_args(stage, data, run, shard_size)
    clean = run_cli(cli, args)
    if clean.returncode:
        raise SystemExit(f"{stage}: {clean.stdout}{clean.stderr}")
    clean_tree = tree_of(fs)
    materialize(initial, fs)
    trace = work / f"{stage}.strace"
    t0 = time.perf_counter()
    done = traced([sys.executable, cli, *args], trace, capture_output=True, text=True, cwd=ROOT)
    traced_s = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{stage} under strace: {done.stdout}{done.stderr}")
    reference = tree_of(fs)
    calls = read_trace(trace)
    replay = Replay(initial, fs)
    events = replay.run(calls)  # raises unless the model ends where the disk did
    folder = f"{RUN}/{stage}"
    same = deterministic(reference, clean_tree, folder)
    cuts = cut_points(events, len(calls), n_cuts, folder, rng)
    kinds = {e.index + 1: e.kind for e in events}
    log(f"  {stage}: {len(calls)} calls traced in {traced_s:.0f} s, {len(events)} on the run's files; "
        f"{len(same)} of {len([r for r, d in under(reference, folder).items() if d is not None])} files "
        f"byte-equal between two runs")
    results = []
    for cut, durable, volatile in replay.states(calls, cuts):
        lost = published_lost(durable, volatile, folder)
        materialize(durable, fs)
        t0 = time.perf_counter()
        rerun = run_cli(cli, args)
        after = tree_of(fs)
        problems = compare(after, reference, same, folder, inputs) if rerun.returncode == 0 else [
            f"exit {rerun.returncode}: {(rerun.stdout + rerun.stderr).strip().splitlines()[-1][:300]}"]
        up_to_date = "up to date" in rerun.stdout
        last = cut == len(calls)
        resumed = next((line for line in rerun.stdout.splitlines() if "resuming" in line or "already" in line),
                       None)
        results.append({"cut": cut, "of": len(calls), "after": kinds.get(cut, "end" if last else "call"),
                        "torn": cuts[cut] is not None, "published": len(
                            [r for r, d in under(volatile, folder).items() if d is not None and not is_temporary(r)]),
                        "published_lost": len(lost), "lost": lost[:5], "rerun_s": round(time.perf_counter() - t0, 1),
                        "up_to_date": up_to_date, "resumed": resumed, "equal": not problems, "problems": problems})
        log(f"    cut {cut}/{len(calls)} after {results[-1]['after']}{' torn' if results[-1]['torn'] else ''}: "
            f"{len(lost)} of {results[-1]['published']} published files lost; rerun "
            f"{'up to date' if up_to_date else (resumed or 'from scratch')}; "
            f"{'equal' if not problems else problems}")
    last = next(r for r in results if r["cut"] == len(calls))
    return {"calls": len(calls), "events": len(events), "traced_s": round(traced_s, 1),
            "deterministic_files": len(same), "cuts": results,
            "summary": {"cuts": len(results), "torn": sum(r["torn"] for r in results),
                        "equal": sum(r["equal"] for r in results),
                        "finished_stage_survived": last["up_to_date"],
                        "cuts_losing_published_files": sum(r["published_lost"] > 0 for r in results),
                        "published_files_lost_max": max(r["published_lost"] for r in results),
                        "finished_files_lost_at_last_cut": last["published_lost"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cli", default=str(ROOT / "cli.py"), help="the duch CLI checked [this checkout's cli.py]")
    ap.add_argument("--before", help="an older duch's cli.py, checked the same way as 'before'")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--cuts", type=int, default=20, help="cuts per stage and CLI")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--data", type=Path, default=UCM)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    clis = cli_pair(args.cli, args.before)
    stages = [s for s in args.stages.split(",") if s]
    if not set(stages) <= set(STAGES):
        raise SystemExit(f"--stages: choose among {', '.join(STAGES)}")
    load_start = os.getloadavg()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="power_cut-") as tmp:
        data = ucm_subset(args.data, args.images, Path(tmp) / "data")
        for label, cli in clis.items():
            log(f"{label}: {cli}")
            results[label] = {stage: check_stage(cli, stage, data, Path(tmp) / label, args.cuts, args.shard_size,
                                                 random.Random(f"{args.seed}-{stage}"))
                              for stage in stages}
    print("\n| duch | stage | cuts (torn) | reruns equal to an uninterrupted run | finished stage survives a cut | "
          "cuts losing published files | most lost at one cut |")
    print("|---|---|---|---|---|---|---|")
    for label, per_stage in results.items():
        for stage, res in per_stage.items():
            s = res["summary"]
            print(f"| {label} | {stage} | {s['cuts']} ({s['torn']}) | {s['equal']} of {s['cuts']} | "
                  f"{'yes' if s['finished_stage_survived'] else 'no'} | "
                  f"{s['cuts_losing_published_files']} | {s['published_files_lost_max']} |")
    path = save("power_cut", {"settings": {**vars(args), "data": str(args.data), "clis": clis},
                              "load_average_start": load_start, "load_average_end": os.getloadavg(),
                              "results": results})
    print(f"saved {path}")


if __name__ == "__main__":
    main()

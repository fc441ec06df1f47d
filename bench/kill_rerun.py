"""Kill a stage while its child processes are alive, rerun it at once: how long until the rerun has the run?

    python bench/kill_rerun.py                                      # this checkout, 5 kills per case
    python bench/kill_rerun.py --before ../before/cli.py     # and an older duch, side by side

Per stage that starts processes of its own, on a UCM subset (real JPEGs, the default encoders, --shard-size 8):
- extract-workers: `extract --workers 2`, DataLoader workers forked by the stage;
- extract-local:   `extract --scheduler local:2`, a dask LocalCluster started by the stage;
- encode-local:    `encode-archive --scheduler local:2` over a run trained here (16 bits, 2 epochs).
One uninterrupted run per case and CLI first measures how long the stage's workers live; each trial then
starts the stage, waits for its workers, waits a random part of that span (and on until workers are alive),
SIGKILLs the stage process alone (as an OOM kill or a pre-emption does), and at once reruns the same command,
again at once after each refusal (the older duch has no --wait), until one attempt gets the run. Timed from the
kill, polled every 10 ms:
- lock free: /proc/locks holds no flock of the killed stage on RUN/.duch.lock any more (its children kept it);
- rerun has the lock: .duch.lock names the rerun's pid (Python and duch's imports included, ~5 s here);
- children gone: every child alive at the kill has exited.
A trial counts when the rerun finishes (exit 0, a manifest) with the outputs of the uninterrupted run. Trials of
the two CLIs alternate, so a loaded machine slows both alike. Writes bench/results/kill_rerun-<machine>-<date>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import UCM, cli_pair, log, save, ucm_subset  # noqa: E402
from duch.pipeline.compute.children import alive, holding  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = ("extract-workers", "extract-local", "encode-local")
POLL_S = 0.01




def descendants(pid: int) -> list[int]:
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                found += [int(child), *descendants(int(child))]
    except OSError:
        pass
    return found


def workers_of(pid: int, case: str) -> list[int]:
    """The stage's worker processes: DataLoader workers (forked: the stage's own command line) or the dask
    workers of its LocalCluster (spawned by multiprocessing); not short-lived helpers (ldconfig and the like)."""
    try:
        own = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    found = []
    for child in descendants(pid):
        try:
            line = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if (line == own) if case == "extract-workers" else (b"multiprocessing.spawn" in line):
            found.append(child)
    return found


def stage_argv(cli: str, case: str, data: Path, run: Path, shard_size: int) -> list[str]:
    if case == "encode-local":
        return [sys.executable, cli, "encode-archive", "--run", str(run), "--device", "cpu", "--threads", "1",
                "--scheduler", "local:2", "--no-progress"]
    where = ["--workers", "2"] if case == "extract-workers" else ["--workers", "0", "--threads", "1",
                                                                  "--scheduler", "local:2"]
    return [sys.executable, cli, "extract", "--data", str(data), "--run", str(run), "--shard-size", str(shard_size),
            "--device", "cpu", "--no-progress", *where]


def stage_folder(case: str, run: Path) -> Path:
    return run / ("encode-archive" if case == "encode-local" else "extract")


def outputs(case: str, run: Path) -> list[tuple[str, str]] | None:
    manifest = stage_folder(case, run) / "manifest.json"
    if not manifest.exists():
        return None
    return [(o["file"], o["sha256"]) for o in json.loads(manifest.read_text())["outputs"]]


def fresh_run(case: str, base: Path, run: Path) -> None:
    """An encode trial starts from the trained run (no codes yet); an extract trial from nothing."""
    if run.exists():
        shutil.rmtree(run)
    if case == "encode-local":
        shutil.copytree(base, run)


def trained_base(cli: str, data: Path, folder: Path, shard_size: int) -> Path:
    """A run extracted and trained by `cli` itself (each duch reads the runs it makes)."""
    run = folder / "trained"
    common = dict(check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    subprocess.run([sys.executable, cli, "extract", "--data", str(data), "--run", str(run), "--shard-size",
                    str(shard_size), "--device", "cpu", "--workers", "0", "--no-progress"], **common)
    subprocess.run([sys.executable, cli, "train-hash", "--run", str(run), "--bits", "16", "--epochs", "2",
                    "--split", "all", "--device", "cpu", "--no-progress"], **common)
    return run


def calibrate(argv: list[str], case: str, min_children: int) -> dict:
    """An uninterrupted run: when its workers first showed (s from its start) and how long they could be
    killed with (until the stage ended)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
                            start_new_session=True)
    first = None
    while proc.poll() is None:
        if first is None and len(workers_of(proc.pid, case)) >= min_children:
            first = time.monotonic() - t0
        time.sleep(POLL_S)
    _, err = proc.communicate()
    if proc.returncode != 0 or first is None:
        raise SystemExit(f"{' '.join(argv)}: exit {proc.returncode}, children seen: {first is not None}\n"
                         f"{err.decode()[-2000:]}")
    return {"children_after_s": round(first, 3), "window_s": round(time.monotonic() - t0 - first, 3)}


def trial(argv: list[str], case: str, lock: Path, window_s: float, min_children: int, rng: random.Random
          ) -> dict | None:
    """One kill and rerun (None when the stage ended before the kill: a miss, tried again)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    while proc.poll() is None and len(workers_of(proc.pid, case)) < min_children and time.monotonic() < deadline:
        time.sleep(0.005)
    delay = rng.uniform(0, 0.9 * window_s)
    time.sleep(delay)
    # At the first moment from there on when the workers are alive (a stage may run a while between two sets).
    while proc.poll() is None and len(workers := workers_of(proc.pid, case)) < min_children:
        time.sleep(0.005)
    children = descendants(proc.pid)
    if proc.poll() is not None:
        return None
    killed = {proc.pid, *children}
    holders_at_kill = holding(lock)
    os.kill(proc.pid, signal.SIGKILL)
    t_kill = time.monotonic()
    proc.wait()
    free_at_once = not killed & set(flock_pids(lock))  # before the rerun's start, which takes a while to fork
    out = {"delay_s": round(delay, 3), "children_at_kill": len(children), "workers_at_kill": len(workers),
           "lock_holders_at_kill": len([p for p in holders_at_kill if p in killed]),
           "lock_holding_children_at_kill": len([p for p in holders_at_kill if p in children]),
           "lock_free_s": round(time.monotonic() - t_kill, 3) if free_at_once else None,
           "rerun_has_lock_s": None, "children_gone_s": None, "refusals": 0, "refused": None}
    while True:
        rerun = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                                 start_new_session=True)
        while rerun.poll() is None:
            now = time.monotonic() - t_kill
            if out["lock_free_s"] is None and not killed & set(flock_pids(lock)):
                out["lock_free_s"] = round(now, 3)
            if out["rerun_has_lock_s"] is None and holder_pid(lock) == rerun.pid:
                out["rerun_has_lock_s"] = round(now, 3)
            if out["children_gone_s"] is None and not any(alive(p) for p in children):
                out["children_gone_s"] = round(now, 3)
            time.sleep(POLL_S)
        said = rerun.communicate()[0].decode()
        if rerun.returncode == 0:
            out["rerun_s"] = round(time.monotonic() - t_kill, 3)
            return out
        if "in use by another duch process" not in said and "is locked by" not in said:
            raise SystemExit(f"rerun failed otherwise:\n{said[-2000:]}")
        out["refusals"] += 1
        out["refused"] = out["refused"] or said.strip().splitlines()[-1][:300]
        if out["refusals"] > 50:
            raise SystemExit(f"rerun refused 50 times:\n{said[-2000:]}")


def flock_pids(lock: Path) -> list[int]:
    """The pids /proc/locks gives for the flocks on `lock`: the process that took each, as long as any process
    still holds it (a killed holder's pid while its children keep the lock). One small read, unlike a scan of
    every process's open files."""
    st = lock.stat()
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "FLOCK" in fields and fields[fields.index("FLOCK") + 4] == inode:
            pids.append(int(fields[fields.index("FLOCK") + 3]))
    return pids


def holder_pid(lock: Path) -> int | None:
    try:
        return int(json.loads(lock.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def summary(trials: list[dict]) -> dict:
    def med(key):
        values = [t[key] for t in trials if t.get(key) is not None]
        return round(statistics.median(values), 3) if values else None

    def top(key):
        values = [t[key] for t in trials if t.get(key) is not None]
        return round(max(values), 3) if values else None

    return {"kills": len(trials), "workers_at_kill": med("workers_at_kill"),
            "kills_with_children_holding_lock": sum(t["lock_holding_children_at_kill"] > 0 for t in trials),
            "refused_reruns": sum(t["refusals"] > 0 for t in trials), "refusals": sum(t["refusals"] for t in trials),
            "lock_free_median_s": med("lock_free_s"), "lock_free_max_s": top("lock_free_s"),
            "rerun_has_lock_median_s": med("rerun_has_lock_s"), "rerun_has_lock_max_s": top("rerun_has_lock_s"),
            "children_gone_median_s": med("children_gone_s"), "children_gone_max_s": top("children_gone_s"),
            "outputs_equal": sum(t["outputs_equal"] for t in trials)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cli", default=str(ROOT / "cli.py"), help="the duch CLI measured [this checkout's cli.py]")
    ap.add_argument("--before", help="an older duch's cli.py, measured side by side as 'before'")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--kills", type=int, default=5, help="kills per case and CLI")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--data", type=Path, default=UCM)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    clis = cli_pair(args.cli, args.before)
    cases = [c for c in args.cases.split(",") if c]
    if not set(cases) <= set(CASES):
        raise SystemExit(f"--cases: choose among {', '.join(CASES)}")
    rng = random.Random(args.seed)
    load_start = os.getloadavg()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="kill_rerun-") as tmp:
        tmp = Path(tmp)
        data = ucm_subset(args.data, args.images, tmp / "data")
        bases = {}
        if "encode-local" in cases:
            for label, cli in clis.items():
                log(f"{label}: extract + train-hash of the run encode-archive codes")
                bases[label] = trained_base(cli, data, tmp / f"base-{label}", args.shard_size)
        for case in cases:
            min_children = 1 if case == "extract-workers" else 2  # local:2, both workers
            per_cli, reference = {}, {}
            for label, cli in clis.items():
                run = tmp / f"run-{label}"
                fresh_run(case, bases.get(label), run)
                argv = stage_argv(cli, case, data, run, args.shard_size)
                per_cli[label] = {"argv": argv[1:], "calibration": calibrate(argv, case, min_children),
                                  "trials": []}
                reference[label] = outputs(case, run)
                log(f"{case} {label}: uninterrupted, children after {per_cli[label]['calibration']['children_after_s']}"
                    f" s, alive {per_cli[label]['calibration']['window_s']} s")
            for k in range(args.kills):
                for label, cli in clis.items():
                    run = tmp / f"run-{label}"
                    argv = stage_argv(cli, case, data, run, args.shard_size)
                    for _attempt in range(10):
                        fresh_run(case, bases.get(label), run)
                        got = trial(argv, case, run / ".duch.lock", per_cli[label]["calibration"]["window_s"],
                                    min_children, rng)
                        if got is not None:
                            break
                    else:
                        raise SystemExit(f"{case} {label}: the stage kept ending before its kill")
                    got["outputs_equal"] = outputs(case, run) == reference[label]
                    per_cli[label]["trials"].append(got)
                    log(f"{case} {label} kill {k + 1}: {json.dumps(got)}")
            for label in clis:
                per_cli[label]["summary"] = summary(per_cli[label]["trials"])
            results[case] = per_cli
    load_end = os.getloadavg()
    print_table(results)
    path = save("kill_rerun", {"settings": {**vars(args), "data": str(args.data), "clis": clis},
                               "load_average_start": load_start, "load_average_end": load_end, "cases": results})
    print(f"saved {path}")


def print_table(results: dict) -> None:
    print("\n| case | duch | kills | workers at kill | kills with a child holding the lock | reruns refused "
          "(refusals) | kill -> lock free, median / max s | kill -> rerun has the lock, median / max s | "
          "kill -> children gone, median s | outputs equal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case, per_cli in results.items():
        for label, res in per_cli.items():
            s = res["summary"]
            print(f"| {case} | {label} | {s['kills']} | {s['workers_at_kill']:g} | "
                  f"{s['kills_with_children_holding_lock']} | {s['refused_reruns']} ({s['refusals']}) | "
                  f"{s['lock_free_median_s']} / {s['lock_free_max_s']} | "
                  f"{s['rerun_has_lock_median_s']} / {s['rerun_has_lock_max_s']} | {s['children_gone_median_s']} | "
                  f"{s['outputs_equal']} of {s['kills']} |")


if __name__ == "__main__":
    main()

"""Every stage's benchmark in one go, each in its own process, into one file bench/results/<machine>-<date>.json.

    python bench/run_all.py --quick          # a 2-core CPU: small sizes, CPU paths (about 10 minutes)
    python bench/run_all.py                  # a GPU machine: full sizes, GPU paths
    python bench/run_all.py --only search_latency,search_ann --run runs/ucm

Each script prints its own table and writes its own JSON (medians of >= 5 timed runs after warm-up, ratios
measured side by side in one process); this runner adds each process's peak resident memory and GPU memory and
gathers everything with the machine and library versions. Stage benchmarks that need a finished run (train
speed on UCM) take it from --run and are skipped, with a note, when it is missing.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, machine_name, new_result_path  # noqa: E402

CHILD = """
import json, resource, sys
sys.path.insert(0, {root!r})
import importlib
result = importlib.import_module({module!r}).main({argv!r})
peak = {{"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}
try:
    import torch
    if torch.cuda.is_available():
        peak["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
except ImportError:
    pass
print("@@RESULT " + json.dumps({{"result": result, **peak}}, default=str))
"""


def plan(quick: bool, run: str) -> dict[str, list[str]]:
    has_run = (Path(run) / "extract" / "manifest.json").exists()
    if quick:
        jobs = {
            "extract_speed": ["--quick"],
            "train_speed": ["--quick"] + (["--run", run] if has_run else []),
            "search_latency": ["--n", "1000000", "--bits", "64,128"],
            "search_ann": ["--n", "200000"],
            "encode_memory": ["--sizes", "10000,100000"],
            "cluster_speed": ["--images", "60", "--codes", "60000"],
        }
    else:
        jobs = {
            "extract_speed": [],
            "train_speed": ["--run", run] if has_run else [],
            "search_speed": [],
            "search_latency": ["--n", "1000000", "--bits", "64,128"],
            "search_ann": ["--n", "1000000"],
            "encode_memory": ["--sizes", "100000,1000000", "--device", "cuda"],
            "cluster_speed": ["--workers", "8", "--images", "2000", "--shard-size", "100"],
        }
    return jobs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a 2-core CPU")
    parser.add_argument("--run", default="runs/ucm", help="a finished run for the UCM training benchmark")
    parser.add_argument("--only", default=None, help="comma-separated benchmark names")
    args = parser.parse_args(argv)
    jobs = plan(args.quick, args.run)
    if args.only:
        jobs = {k: v for k, v in jobs.items() if k in args.only.split(",")}
    results = {}
    for name, job_argv in jobs.items():
        print(f"\n=== {name} {' '.join(job_argv)}", flush=True)
        t = time.perf_counter()
        code = CHILD.format(root=str(ROOT), module=f"bench.{name}", argv=job_argv)
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True, capture_output=True)
        sys.stdout.write(proc.stdout.replace("@@RESULT", "result:")[-4000:])
        marker = [line for line in proc.stdout.splitlines() if line.startswith("@@RESULT ")]
        if proc.returncode or not marker:
            print(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            results[name] = {"failed": True, "exit": proc.returncode, "stderr_tail": proc.stderr[-3000:]}
            continue
        results[name] = {"argv": job_argv, "wall_s": round(time.perf_counter() - t, 1),
                         **json.loads(marker[-1][len("@@RESULT "):])}
    import datetime as dt

    from duch.pipeline.run.manifest import library_versions

    stamp = dt.date.today().isoformat()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = new_result_path(f"{machine_name()}-{stamp}")
    path.write_text(json.dumps({"machine": machine_name(), "date": stamp, "quick": args.quick,
                                "versions": library_versions(), "benchmarks": results}, indent=1, default=str) + "\n")
    print(f"\nsaved {path}")
    failed = [k for k, v in results.items() if v.get("failed")]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")
    return results


if __name__ == "__main__":
    main()

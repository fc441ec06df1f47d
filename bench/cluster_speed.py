"""Scale-out speed: extract and encode-archive in this process vs on a dask.distributed cluster of N workers.

    python bench/cluster_speed.py                          # 2-core CPU: local:2, 240 UCM tiles, 5 runs each
    python bench/cluster_speed.py --workers 8 --images 2000  # a 16-core machine: local:8 over CPU extraction

Three ways to run the same work, timed alternately (none, local, warm, none, local, warm, ...) so that a noisy
shared machine slows them alike; each figure is the median of --runs timed runs after one warm-up round:
- none:  `--scheduler none`, the stage in this process (its DataLoader workers and all torch threads);
- local: `--scheduler local:N`, a LocalCluster that duch starts and closes within the stage (its start-up paid
  every run, as a user of `local:N` pays it);
- warm:  `--scheduler tcp://...` of a LocalCluster of N workers started once beforehand, the way a long-lived
  cluster (dask-jobqueue, dask-kubernetes) is used: its workers keep their encoders between runs.
All on the CPU (--device cpu), so the 2-core CI machine and a 16-core GPU machine measure the same thing.
extract: a UCM subset (real JPEGs, the default offline encoders, 2 augmented views, 5 captions each) into shards
of --shard-size items, a fresh run directory per run. encode-archive: a synthetic archive of --codes items
(512-d, 4096 per shard) through a 64-bit model. The speed-up is the ratio of median wall times (whole stage call,
cluster start included for `local`). Writes bench/results/cluster_speed-<machine>-<date>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import UCM, log, save, ucm_subset  # noqa: E402
from bench.synthetic import make_extract_run  # noqa: E402
from duch.pipeline.config import EncodeConfig, ExtractConfig, TrainConfig  # noqa: E402
from duch.stages.encode_archive import encode_archive  # noqa: E402
from duch.stages.extract import extract  # noqa: E402
from duch.stages.train_hash import train_hash  # noqa: E402

MODES = ("none", "local", "warm")




def scheduler_of(mode: str, workers: int, address: str) -> str:
    return {"none": "none", "local": f"local:{workers}", "warm": address}[mode]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compare(name: str, run_once, workers: int, address: str, runs: int, items: int) -> dict:
    """run_once(scheduler, index) for every mode, one warm-up round then `runs` alternating rounds."""
    seconds: dict[str, list[float]] = {m: [] for m in MODES}
    for round_ in range(runs + 1):
        for mode in MODES:
            s = timed(lambda mode=mode, round_=round_: run_once(scheduler_of(mode, workers, address),
                                                                f"{mode}-{round_}"))
            if round_:  # round 0 warms caches (files, imports, the warm cluster's encoders)
                seconds[mode].append(s)
            log(f"  {name} {mode:>5} round {round_}: {s:.2f} s{'' if round_ else ' (warm-up)'}")
    medians = {m: statistics.median(v) for m, v in seconds.items()}
    return {"items": items, "seconds": seconds, "median_s": medians,
            "items_per_s": {m: items / medians[m] for m in MODES},
            "speedup": {m: medians["none"] / medians[m] for m in MODES}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="cluster worker processes (N of local:N)")
    parser.add_argument("--images", type=int, default=240, help="UCM tiles to extract")
    parser.add_argument("--shard-size", type=int, default=40, help="items per extract shard (tasks = shards)")
    parser.add_argument("--codes", type=int, default=200_000, help="synthetic archive items to encode")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--data", default=str(UCM))
    parser.add_argument("--skip", default="", help="comma-separated: extract, encode")
    args = parser.parse_args(argv)
    from distributed import Client, LocalCluster

    from duch.pipeline.compute.cluster import local_layout

    cores = os.cpu_count() or 1
    _, threads = local_layout(args.workers, 0, cores)
    scratch = Path(tempfile.mkdtemp(prefix="duch-cluster-"))
    result: dict = {"workers": args.workers, "cores": cores, "threads_per_worker": threads, "runs": args.runs}
    limits = {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    try:
        # The warm cluster is laid out as duch lays out local:N (one thread each, cores shared out for torch).
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                          silence_logs=40, env={**limits, "DUCH_TORCH_THREADS": str(threads)}) as warm, \
                Client(warm) as client:
            address = warm.scheduler_address
            log(f"warm cluster {address}: {args.workers} workers, {threads} torch threads each; "
                f"dashboard {client.dashboard_link}")
            if "extract" not in args.skip:
                data = ucm_subset(Path(args.data), args.images, scratch / "ucm")
                captions = sum(len(e["sentences"]) for e in json.loads((data / "dataset_ucm.json").read_text())
                               ["images"])

                def run_extract(scheduler: str, tag: str) -> None:
                    run = scratch / f"extract-{tag}"
                    extract(ExtractConfig(data=str(data), run=str(run), device="cpu", shard_size=args.shard_size,
                                          scheduler=scheduler), progress=False, echo=lambda _: None)
                    shutil.rmtree(run)

                log(f"extract: {args.images} UCM tiles (+2 views each), {captions} captions, "
                    f"shards of {args.shard_size}")
                result["extract"] = compare("extract", run_extract, args.workers, address, args.runs, args.images)
                result["extract"]["captions"] = captions
            if "encode" not in args.skip:
                model = scratch / "model"
                make_extract_run(model, 2000, 512, captions=2, views=1, seed=1)
                train_hash(TrainConfig(run=str(model), bits=(64,), epochs=1, split="all", device="cpu"),
                           progress=False, echo=lambda _: None)
                archive = scratch / "archive"
                make_extract_run(archive, args.codes, 512, seed=2)

                def run_encode(scheduler: str, tag: str) -> None:
                    encode_archive(EncodeConfig(run=str(model), archive=str(archive), device="cpu",
                                                scheduler=scheduler), force=True, progress=False,
                                   echo=lambda _: None)

                log(f"encode-archive: {args.codes} synthetic items, 512-d, 64 bits, shards of 4096")
                result["encode"] = compare("encode", run_encode, args.workers, address, args.runs, args.codes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    log(f"\n{'stage':<16}{'mode':<22}{'median s':>10}{'items/s':>10}{'speed-up':>10}")
    for stage in ("extract", "encode"):
        if stage not in result:
            continue
        for mode in MODES:
            r = result[stage]
            label = {"none": "in-process", "local": f"local:{args.workers}", "warm": f"warm {args.workers} workers"}
            log(f"{stage:<16}{label[mode]:<22}{r['median_s'][mode]:>10.2f}{r['items_per_s'][mode]:>10.1f}"
                f"{r['speedup'][mode]:>9.2f}x")
    path = save("cluster_speed", result)
    log(f"saved {path}")
    return result


if __name__ == "__main__":
    main()

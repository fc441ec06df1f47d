"""DUCH train-hash quality and speed on a finished extract run: mAP@K at every code length, over seeds.

    python bench/train_quality.py --run runs/ucm                      # defaults, seed 0
    python bench/train_quality.py --run runs/ucm --seeds 0,1,2 --set tau=0.5 --label tau0.5
    python bench/train_quality.py --run runs/ucm --seeds 0,1,2 --recipe paper --label paper   # DUCH's settings

Each (setting, seed) trains in a scratch run directory that links the extract stage, so the user's own
RUN/train-hash is never touched. Prints both mAP definitions (mean over seeds), with equal Hamming distances in
database order (the published protocol) and by the query's confidence (query-adaptive, as `search` ranks), and
seconds per code length, and writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import parse_seeds, save  # noqa: E402
from duch.pipeline import DuchError  # noqa: E402
from duch.pipeline.config import TRAIN_RECIPES, TrainConfig, parse_overrides  # noqa: E402
from duch.pipeline.retrieval.metrics import DIRECTIONS  # noqa: E402
from duch.stages.train_hash import train_hash  # noqa: E402


def parse_set(items: list[str]) -> dict:
    try:
        return parse_overrides(items, TrainConfig)
    except DuchError as e:
        raise SystemExit(str(e)) from None


def run_once(extract_dir: Path, recipe: str, settings: dict, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="duch-bench-") as scratch:
        (Path(scratch) / "extract").symlink_to(extract_dir.resolve())
        cfg = TrainConfig.recipe(recipe, run=scratch, seed=seed, eval_every=10**6, **settings)
        result = train_hash(cfg, progress=False, echo=lambda _: None)
        return result.manifest["results"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory with a finished extract stage")
    parser.add_argument("--bits", default="16,32,64,128")
    parser.add_argument("--seeds", default="0", help="e.g. 0,1,2 or 0-9")
    parser.add_argument("--recipe", default="duch", choices=sorted(TRAIN_RECIPES),
                        help="named settings under --set: duch (the defaults) or paper (DUCH's published ones)")
    parser.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides, e.g. tau=0.5 epochs=50")
    parser.add_argument("--label", default="default")
    args = parser.parse_args(argv)

    settings = {"bits": tuple(int(b) for b in args.bits.split(","))} | parse_set(args.set)
    seeds = parse_seeds(args.seeds)
    runs = []
    t0 = time.perf_counter()
    for seed in seeds:
        runs.append(run_once(Path(args.run) / "extract", args.recipe, settings, seed))
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    bits = [str(b) for b in settings["bits"]]
    def mean_table(key: str) -> dict:
        return {b: {d: {defn: float(np.mean([r[b][key][d][defn] for r in runs])) for defn in ("reference", "textbook")}
                    for d in DIRECTIONS} for b in bits}

    table, adaptive = mean_table("map"), mean_table("map_adaptive")
    spread = {b: {d: float(np.std([r[b]["map"][d]["reference"] for r in runs])) for d in DIRECTIONS} for b in bits}
    seconds = {b: float(np.median([r[b]["seconds"] for r in runs])) for b in bits}
    print(f"\n{args.label}: recipe {args.recipe}, {settings} seeds {seeds}")
    for name, values in (("ties in database order", table), ("query-adaptive ties", adaptive)):
        print(f"Hamming ranking, {name}")
        for defn in ("reference", "textbook"):
            print(f"{'mAP@20 ' + defn:<22}" + "".join(f"{b + ' bits':>10}" for b in bits))
            for d in DIRECTIONS:
                print(f"{d:<22}" + "".join(f"{values[b][d][defn]:>10.3f}" for b in bits))
    print(f"{'seconds (median)':<22}" + "".join(f"{seconds[b]:>10.1f}" for b in bits))
    path = save(f"train_quality-{args.label}", {
        "run": args.run, "recipe": args.recipe,
        "resolved": TrainConfig.recipe(args.recipe, run="", **settings).output_settings(),
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
        "seeds": seeds, "map": table, "map_adaptive": adaptive, "std_reference": spread, "seconds_per_bits": seconds,
        "per_seed": [{b: r[b]["map"] for b in bits} for r in runs],
        "per_seed_adaptive": [{b: r[b]["map_adaptive"] for b in bits} for r in runs]})
    print(f"saved {path}")
    return table


if __name__ == "__main__":
    main()

"""How train-hash holds up when training captions are wrong: mAP@20 as a share of the training items is given
another item's captions (TrainConfig.caption_noise), the robustness study of CHNR (Mikriukov et al., ICIP 2022).

    python bench/caption_noise.py --run runs/ucm                                  # 64 bits, 0-50 %, seed 0
    python bench/caption_noise.py --run runs/ucm --shares 0,0.05,0.2,0.5 --seeds 0,1,2

Every (share, seed) trains in a scratch run directory (as bench/train_quality.py does); evaluation always uses the
true captions. Prints the table next to CHNR's published DUCH figures and writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import parse_seeds, save  # noqa: E402
from bench.train_quality import parse_set, run_once  # noqa: E402
from duch.pipeline.retrieval.metrics import DIRECTIONS  # noqa: E402

# CHNR (ICIP 2022), DUCH on UCM-captions at 64 bits (ResNet18 + BERT features), mAP@20 I->T / T->I by share of
# wrong training captions: the two ends of its sweep, as docs/design.md, 4.7 quotes them.
PUBLISHED_DUCH_64 = {0.05: (0.840, 0.925), 0.5: (0.557, 0.641)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory with a finished extract stage")
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--shares", default="0,0.05,0.2,0.5", help="shares of training items with wrong captions")
    parser.add_argument("--seeds", default="0", help="e.g. 0,1,2 or 0-9")
    parser.add_argument("--recipe", default="duch", choices=("duch", "paper"))
    parser.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides, as in train_quality.py")
    parser.add_argument("--label", default="default")
    args = parser.parse_args(argv)

    shares = [float(s) for s in args.shares.split(",")]
    seeds = parse_seeds(args.seeds)
    settings = {"bits": (args.bits,)} | parse_set(args.set)
    if "caption_noise" in settings:
        raise SystemExit("--set caption_noise: give the shares with --shares")
    b = str(args.bits)
    table, per_seed = {}, {}
    t0 = time.perf_counter()
    for share in shares:
        runs = [run_once(Path(args.run) / "extract", args.recipe, settings | {"caption_noise": share}, seed)[b]["map"]
                for seed in seeds]
        table[share] = {d: {defn: float(np.mean([r[d][defn] for r in runs])) for defn in ("reference", "textbook")}
                        for d in DIRECTIONS}
        per_seed[share] = runs
        print(f"share {share:g} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    print(f"\nmAP@20 at {args.bits} bits by share of training items with wrong captions; seeds {seeds}")
    print(f"{'wrong captions':<16}" + "".join(f"{d + ' ref':>11}" for d in DIRECTIONS)
          + "".join(f"{d + ' tb':>10}" for d in ("I->T", "T->I")))
    for share in shares:
        row = table[share]
        print(f"{share:<16.0%}" + "".join(f"{row[d]['reference']:>11.3f}" for d in DIRECTIONS)
              + "".join(f"{row[d]['textbook']:>10.3f}" for d in ("I->T", "T->I")))
    if args.bits == 64:
        print("published DUCH (CHNR, ResNet18 + BERT features), reference mAP@20 I->T / T->I: "
              + ", ".join(f"{s:.0%} wrong {i:.3f} / {t:.3f}" for s, (i, t) in PUBLISHED_DUCH_64.items()))
    path = save(f"caption_noise-{args.label}", {
        "run": args.run, "recipe": args.recipe, "bits": args.bits, "seeds": seeds,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
        "map": {str(s): v for s, v in table.items()}, "per_seed": {str(s): v for s, v in per_seed.items()},
        "published_duch_64": {str(s): {"I->T": i, "T->I": t} for s, (i, t) in PUBLISHED_DUCH_64.items()}})
    print(f"saved {path}")
    return table


if __name__ == "__main__":
    main()

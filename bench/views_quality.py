"""What the augmented image views buy at archive-coding time: mAP of image codes with and without them.

    python bench/views_quality.py --run runs/ucm --views0 runs/ucm-views0 --bits 64 --seeds 0-4

Training needs the views (train-hash refuses an extract without them), so the question is only how the archive is
coded: an archive extracted with `--image-views 2` gets view-averaged image codes (`view_ensemble`, the default),
one extracted with `--image-views 0` codes each image alone. Per seed the heads are trained once on RUN's extract
(the `duch` recipe, as bench/train_quality.py), then the held-out split is coded three ways by the same heads:
views2 (RUN's images and their 2 views, averaged), views0 (the --views0 run's own image features, the image
alone: what `encode-archive`/`add` make of that extract) and views0-same (RUN's image features alone, to show the
two extracts' images agree). Writes train_quality-LABEL files in bench/train_quality.py's format, one per coding,
so bench/compare_quality.py compares them seed by seed (paired: the same heads).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import parse_seeds, save  # noqa: E402
from duch.pipeline import DuchError  # noqa: E402
from duch.pipeline.compute.device import resolve_device, resolve_precision  # noqa: E402
from duch.pipeline.config import TrainConfig, parse_overrides  # noqa: E402
from duch.pipeline.formats.features import load_features  # noqa: E402
from duch.pipeline.retrieval.metrics import DIRECTIONS  # noqa: E402
from duch.pipeline.train.data import check_features, choose_split, prepare  # noqa: E402
from duch.pipeline.train.loop import train_bits  # noqa: E402
from duch.pipeline.train.validate import evaluate_codes  # noqa: E402

CODINGS = ("views2", "views0", "views0-same")


def aligned_images(run: Path, views0: Path, ids: np.ndarray) -> np.ndarray:
    """The --views0 run's image features in RUN's item order (the two extracts list the same dataset)."""
    other = load_features(views0)
    if other.views is not None and other.views.shape[1]:
        raise SystemExit(f"{views0}: its extract has {other.views.shape[1]} image views; give one made with "
                         "--image-views 0")
    where = {i: k for k, i in enumerate(other.ids)}
    missing = [i for i in ids if i not in where]
    if missing:
        raise SystemExit(f"{views0} lacks {len(missing)} of {run}'s items (e.g. {missing[0]!r})")
    return np.asarray(other.image, np.float32)[[where[i] for i in ids]]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run with a finished extract stage made with image views")
    parser.add_argument("--views0", required=True, help="run with the same data extracted with --image-views 0")
    parser.add_argument("--bits", default="64")
    parser.add_argument("--seeds", default="0-4")
    parser.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides, e.g. epochs=10 (a smoke test)")
    args = parser.parse_args(argv)
    try:
        settings = parse_overrides(args.set, TrainConfig)
    except DuchError as e:
        raise SystemExit(str(e)) from None
    bits, seeds = [int(b) for b in args.bits.split(",")], parse_seeds(args.seeds)

    features = load_features(args.run)
    try:
        check_features(features)
    except DuchError as e:
        raise SystemExit(str(e)) from None
    image0 = aligned_images(Path(args.run), Path(args.views0), features.ids)
    image2 = np.asarray(features.image, np.float32)
    cosine = np.sum(image0 * image2, 1) / np.linalg.norm(image0, axis=1) / np.linalg.norm(image2, axis=1)
    print(f"image features of the two extracts: least cosine {cosine.min():.6f}, median {np.median(cosine):.6f}")
    device = resolve_device("auto")
    per = {c: {"map": [], "map_adaptive": []} for c in CODINGS}
    seconds: dict[str, list[float]] = {str(b): [] for b in bits}
    t0 = time.perf_counter()
    for seed in seeds:
        cfg = TrainConfig.recipe("duch", run="", seed=seed, eval_every=10**6, **settings)
        cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))
        split = choose_split(features, cfg)
        data = prepare(features, device)
        eval_text = torch.as_tensor(features.one_caption_per_image(cfg.split_seed), device=device)
        alone = dataclasses.replace(data, image=torch.as_tensor(image0, dtype=torch.float32, device=device))
        rows = {c: {} for c in CODINGS}
        for b in bits:
            # No validation during training (labels "" skips it): the three codings below are the evaluation.
            trained = train_bits(b, cfg, data, split, None, features.labels, progress=False)
            seconds[str(b)].append(trained.seconds)
            for coding, d, ensemble in (("views2", data, True), ("views0", alone, False),
                                        ("views0-same", data, False)):
                rows[coding][str(b)] = evaluate_codes(trained.heads, d, split, eval_text, features.labels,
                                                      cfg.map_k, ensemble)
        for coding in CODINGS:
            for key in ("map", "map_adaptive"):
                per[coding][key].append({b: r[key] for b, r in rows[coding].items()})
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s): {bits[0]} bits I->T "
              + ", ".join(f"{c} {rows[c][str(bits[0])]['map']['I->T']['reference']:.3f}" for c in CODINGS), flush=True)

    def mean(runs: list[dict]) -> dict:
        return {str(b): {d: {defn: float(np.mean([r[str(b)][d][defn] for r in runs]))
                             for defn in ("reference", "textbook")} for d in DIRECTIONS} for b in bits}

    out = {}
    for coding in CODINGS:
        table = mean(per[coding]["map"])
        print(f"\n{coding}: mAP@20 reference, ties in database order, mean of seeds {seeds}")
        for d in DIRECTIONS:
            print(f"{d:<8}" + "".join(f"{table[str(b)][d]['reference']:>10.3f}" for b in bits))
        path = save(f"train_quality-{coding}", {
            "run": args.run, "views0_run": args.views0, "recipe": "duch", "coding": coding,
            "settings": {"bits": bits, **settings}, "seeds": seeds,
            "map": table, "map_adaptive": mean(per[coding]["map_adaptive"]),
            "image_feature_cosine": {"min": float(cosine.min()), "median": float(np.median(cosine))},
            "seconds_per_bits": {b: float(np.median(s)) for b, s in seconds.items()},
            "per_seed": per[coding]["map"], "per_seed_adaptive": per[coding]["map_adaptive"]})
        print(f"saved {path}")
        out[coding] = table
    return out


if __name__ == "__main__":
    main()

"""Routes to better short codes that were measured and closed, each side by side with the defaults.

    python bench/closed_routes.py --run runs/ucm --seeds 0-9                  # 16 bits: every hashing probe
    python bench/closed_routes.py --run runs/ucm --seeds 0-4 --bits 64 --skip nested
    python bench/closed_routes.py --pooling ../shared/datasets/ucm/dataset_ucm.json   # the encoder's poolings

Per seed it trains the defaults at --bits (the baseline, as bench/train_quality.py does) and then:
- rankings: ranks the baseline's codes five ways: Hamming with ties in database order (the published protocol),
  query-adaptive ties (as `search`), asymmetric (the query's continuous code against the items' bits, the
  weighted distance alone), Hamming after an ITQ rotation fitted on the training items' continuous codes
  (Gong and Lazebnik, CVPR 2011), and the continuous codes' cosine (no hashing: what the bits lose);
- statistics: label-free figures of the training run (final loss terms, instance recall of image-caption pairs
  among the training items, spread of the image codes), correlated over seeds with each direction's mAP: could
  one pick a good seed without labels?
- nested: trains --nested-from bits (64) with DUCH's three contrastive terms also on the first --bits bits
  (Matryoshka-style nested codes, Kusupati et al., NeurIPS 2022) and ranks that prefix.
--pooling instead embeds the dataset's images with efficientnet-lite0 and ranks the raw features (I->I, cosine,
leave one out) under other poolings of its last feature map and its blocks: is there more class signal in the
encoder than its average pooling gives the heads?
mAP@20, reference definition, paper split; paired t-tests against the baseline over seeds. Saves JSON to
bench/results/closed_routes-*.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import parse_seeds, save  # noqa: E402
from bench.compare_quality import difference_test  # noqa: E402
from duch.pipeline.compute.device import resolve_precision  # noqa: E402
from duch.pipeline.config import TRAIN_RECIPES, TrainConfig  # noqa: E402
from duch.pipeline.formats.features import load_features  # noqa: E402
from duch.pipeline.model.coding import encode, image_codes, pack_codes, unpack_codes  # noqa: E402  # noqa: E402
from duch.pipeline.retrieval.hamming import hamming  # noqa: E402
from duch.pipeline.retrieval.metrics import (  # noqa: E402
    DIRECTIONS,
    average_precisions,
    cosine,
    map_of_ranking,
    per_class_mean,
    query_adaptive_ranking,
    ranking,
    recall_at_k,
    weighted_distances,
)
from duch.pipeline.train.data import check_features, choose_split, prepare  # noqa: E402
from duch.pipeline.train.loop import train_bits  # noqa: E402
from duch.pipeline.train.validate import split_codes  # noqa: E402

RANKINGS = ("hamming", "adaptive", "asymmetric", "itq", "continuous")
STATISTICS = ("loss_inter", "loss_image", "loss_text", "loss_quantization", "train_recall10", "image_spread")


# ------------------------------------------------------------------------------------------- pure functions
def signs(h: np.ndarray) -> np.ndarray:
    """+-1 codes, +1 where h >= 0: the bits as encode-archive packs them, unpacked."""
    return unpack_codes(pack_codes(np.asarray(h)), h.shape[1])


def hamming_of(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """[Q, N] Hamming distances of the continuous codes' bits, by the archive's own packed-code scan."""
    return hamming(pack_codes(np.asarray(q)), pack_codes(np.asarray(d))).astype(np.int32)


def itq_rotation(v: np.ndarray, iters: int = 50, seed: int = 0) -> np.ndarray:
    """ITQ: the orthogonal R minimising ||sign(vR) - vR||^2 by alternating B = sign(vR) and the orthogonal
    Procrustes solution R = U W^T of v^T B = U S W^T, from a random rotation."""
    v = np.asarray(v, np.float64)
    r = np.linalg.qr(np.random.default_rng(seed).standard_normal((v.shape[1],) * 2))[0]
    for _ in range(iters):
        u, _, wt = np.linalg.svd(v.T @ signs(v @ r))
        r = u @ wt
    return r


def rank_ways(q: np.ndarray, d: np.ndarray, rotation: np.ndarray) -> dict[str, np.ndarray]:
    """The five rankings of database codes d for query codes q (continuous, [Q, K] and [N, K])."""
    distance = hamming_of(q, d)
    weighted = weighted_distances(q, signs(d))
    return {"hamming": ranking(-distance), "adaptive": query_adaptive_ranking(distance, weighted),
            "asymmetric": ranking(-weighted), "itq": ranking(-hamming_of(q @ rotation, d @ rotation)),
            "continuous": ranking(cosine(q, d))}


def hamming_only(q: np.ndarray, d: np.ndarray) -> dict[str, np.ndarray]:
    return {"hamming": ranking(-hamming_of(q, d))}


def pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def critical_r(n: int, level: float = 0.05) -> float:
    """The |r| past which a Pearson correlation of n pairs is significant at `level` (two-sided t-test)."""
    from scipy.stats import t

    q = t.ppf(1 - level / 2, n - 2)
    return float(q / np.sqrt(n - 2 + q * q))


# ---------------------------------------------------------------------------------------------- one seed
class Setup:
    """What train-hash builds before training, on the CPU: features, split, tensors, evaluation captions."""

    def __init__(self, run: Path, cfg: TrainConfig):
        self.features = load_features(run)
        check_features(self.features)
        self.split = choose_split(self.features, cfg)
        self.data = prepare(self.features, torch.device("cpu"))
        self.eval_text = torch.as_tensor(self.features.one_caption_per_image(cfg.split_seed))
        self.labels = self.features.labels


def map_table(codes: dict, orders_of, setup: Setup, k: int) -> dict[str, dict[str, float]]:
    """{ranking: {direction: mAP@k}} for orders_of(q, d) -> {ranking: order}."""
    lq, ld = setup.labels[setup.split.query], setup.labels[setup.split.database]
    out: dict[str, dict[str, float]] = {}
    for direction in DIRECTIONS:
        src, dst = direction.split("->")
        for name, order in orders_of(codes[src][0], codes[dst][1]).items():
            out.setdefault(name, {})[direction] = map_of_ranking(order, lq, ld, k, "reference")
    return out


def train_statistics(run: dict, setup: Setup, image: np.ndarray) -> dict[str, float]:
    """Label-free figures of a trained model on its own training items, whose image codes are `image`."""
    data = setup.data
    rows = [data.captions[i, :data.n_captions[i]] for i in setup.split.train.tolist()]
    owner = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    text = encode(run.heads.text, data.text[torch.cat(rows)]).numpy()
    positive = owner[None, :] == np.arange(len(rows))[:, None]
    distance = hamming_of(image, text)
    recall = (recall_at_k(ranking(-distance), positive, (10,))[10]
              + recall_at_k(ranking(-distance.T), positive.T, (10,))[10]) / 2
    last = run.history[-1]
    return {"loss_inter": last["inter"], "loss_image": last["image"], "loss_text": last["text"],
            "loss_quantization": last["quantization"], "train_recall10": recall,
            "image_spread": float(hamming_of(image, image).mean() / image.shape[1])}


def one_seed(setup: Setup, cfg: TrainConfig, bits: int, nested_from: int, skip: set[str]) -> dict:
    def codes_of(heads, first: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        pairs = split_codes(heads, setup.data, setup.split, setup.eval_text, cfg.view_ensemble)
        return {m: tuple(c[:, :first].numpy() for c in pair) for m, pair in pairs.items()}

    base = train_bits(bits, cfg, setup.data, setup.split, None, setup.labels, progress=False)
    codes = codes_of(base.heads)
    train = setup.split.train
    train_image = image_codes(base.heads.image, setup.data.image[train],
                                 setup.data.views[train] if cfg.view_ensemble else None).numpy()
    row: dict = {"seed": cfg.seed}
    if "rankings" in skip:
        row["map"] = map_table(codes, hamming_only, setup, cfg.map_k)
    else:
        first_captions = encode(base.heads.text, setup.data.text[setup.data.captions[train, 0]]).numpy()
        rotation = itq_rotation(np.vstack([train_image, first_captions]), seed=cfg.seed)
        row["map"] = map_table(codes, lambda q, d: rank_ways(q, d, rotation), setup, cfg.map_k)
    if "statistics" not in skip:
        row["statistics"] = train_statistics(base, setup, train_image)
    if "nested" not in skip and nested_from > bits:
        run = train_bits(nested_from, dataclasses.replace(cfg, nested_bits=bits), setup.data, setup.split, None,
                         setup.labels, progress=False)
        row["nested_prefix"] = map_table(codes_of(run.heads, bits), hamming_only, setup, cfg.map_k)["hamming"]
        row["nested_full"] = map_table(codes_of(run.heads), hamming_only, setup, cfg.map_k)["hamming"]
    return row


def summarise(rows: list[dict], bits: int, nested_from: int) -> dict:
    base = {d: [r["map"]["hamming"][d] for r in rows] for d in DIRECTIONS}
    out: dict = {"baseline": {d: float(np.mean(v)) for d, v in base.items()}, "versus_baseline": {}}
    variants = {name: [r["map"][name] for r in rows] for name in rows[0]["map"] if name != "hamming"}
    if "nested_prefix" in rows[0]:
        variants[f"nested {nested_from} -> first {bits}"] = [r["nested_prefix"] for r in rows]
    for name, tables in variants.items():
        out["versus_baseline"][name] = {d: difference_test(base[d], [t[d] for t in tables], paired=True)
                                        for d in DIRECTIONS}
    if "nested_full" in rows[0]:
        out["nested_full"] = {d: float(np.mean([r["nested_full"][d] for r in rows])) for d in DIRECTIONS}
    if "statistics" in rows[0] and len(rows) > 2:
        out["correlation"] = {s: {d: pearson([r["statistics"][s] for r in rows], base[d]) for d in DIRECTIONS}
                              for s in STATISTICS}
    return out


def print_summary(summary: dict, bits: int, seeds: list[int]) -> None:
    print(f"\n{bits} bits, seeds {seeds}: mAP@20 (reference), mean over seeds; paired against the baseline")
    print(f"{'ranking / model':<30}" + "".join(f"{d:>18}" for d in DIRECTIONS))
    print(f"{'baseline: Hamming, db order':<30}" + "".join(f"{summary['baseline'][d]:>18.3f}" for d in DIRECTIONS))
    for name, tests in summary["versus_baseline"].items():
        print(f"{name:<30}" + "".join(f"{t['other']:>8.3f} {t['difference']:+.3f} p{t['p']:.2f}"
                                      for t in tests.values()))
    if "nested_full" in summary:
        print(f"{'nested, all its bits':<30}" + "".join(f"{summary['nested_full'][d]:>18.3f}" for d in DIRECTIONS))
    if "correlation" in summary:
        print(f"Pearson r over seeds, label-free statistic against mAP (p < .05 where |r| > "
              f"{critical_r(len(seeds)):.2f})")
        for name, by_direction in summary["correlation"].items():
            print(f"{name:<30}" + "".join(f"{v:>+18.2f}" for v in by_direction.values()))


# --------------------------------------------------------------------------------------------- poolings
def pooling_probe(annotation: Path, limit: int | None = None, batch: int = 50) -> dict:
    """I->I mAP@20 of efficientnet-lite0's raw features under several poolings (cosine, leave one out)."""
    from PIL import Image

    from duch.data.readers import read_dataset
    from duch.pipeline.encoders.efficientnet_lite import build_model, make_transform

    dataset = read_dataset(annotation)
    items = dataset.items[:limit] if limit else dataset.items
    model, transform = build_model(), make_transform()
    blocks: dict[int, torch.Tensor] = {}
    for i in (4, 5):
        model.blocks[i].register_forward_hook(lambda _m, _x, out, i=i: blocks.__setitem__(i, out))
    pooled: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for s in range(0, len(items), batch):
            x = torch.stack([transform(Image.open(dataset.images_dir / it.image).convert("RGB"))
                             for it in items[s:s + batch]])
            f = model.forward_features(x)  # [B, 1280, 7, 7], what the default average-pools
            for name, value in (("average (default)", f.mean((2, 3))),
                                ("GeM p=3", f.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)),
                                ("max", f.amax((2, 3))),
                                ("2x2 grid of averages", torch.nn.functional.adaptive_avg_pool2d(f, 2).flatten(1)),
                                ("block 5 average", blocks[4].mean((2, 3))),
                                ("block 6 average", blocks[5].mean((2, 3)))):
                pooled.setdefault(name, []).append(value)
    features = {k: torch.cat(v).numpy().astype(np.float64) for k, v in pooled.items()}
    standard = lambda a: (a - a.mean(0)) / (a.std(0) + 1e-6)  # noqa: E731
    features["average + max"] = np.hstack([standard(features["average (default)"]), standard(features["max"])])
    features["average + blocks 5, 6"] = np.hstack([standard(features[k]) for k in
                                                   ("average (default)", "block 5 average", "block 6 average")])
    labels = np.array([it.label for it in items])
    out, lowest = {}, None
    for name, x in features.items():
        sim = cosine(x, x)
        np.fill_diagonal(sim, -np.inf)  # leave the query out
        ap = average_precisions(ranking(sim)[:, :-1], labels, labels, 20, "reference")
        by_class = per_class_mean(ap, labels)
        lowest = lowest or list(by_class)[:3]  # the default pooling's three weakest classes
        out[name] = {"dim": x.shape[1], "map_ii": float(ap.mean()), "lowest_classes": {c: by_class[c] for c in lowest}}
    return {"items": len(items), "poolings": out}


# -------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="run directory with a finished extract stage")
    parser.add_argument("--bits", type=int, default=16)
    parser.add_argument("--seeds", default="0-9")
    parser.add_argument("--nested-from", type=int, default=64)
    parser.add_argument("--skip", default="", help="comma list of rankings, statistics, nested")
    parser.add_argument("--recipe", default="duch", choices=sorted(TRAIN_RECIPES))
    parser.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides, as bench/train_quality.py")
    parser.add_argument("--pooling", type=Path, help="a caption JSON: run the pooling probe on its images instead")
    parser.add_argument("--limit", type=int, help="--pooling: the first N items only")
    args = parser.parse_args(argv)
    if args.pooling:
        result = pooling_probe(args.pooling, args.limit)
        lowest = list(next(iter(result["poolings"].values()))["lowest_classes"])
        print(f"\nefficientnet-lite0 raw features, {result['items']} images: I->I mAP@20 (reference), cosine, leave "
              "one out; then the default's three weakest classes")
        print(f"{'pooling':<26}{'dim':>6}{'all':>8}" + "".join(f"{c[:18]:>20}" for c in lowest))
        for name, r in result["poolings"].items():
            print(f"{name:<26}{r['dim']:>6}{r['map_ii']:>8.3f}"
                  + "".join(f"{r['lowest_classes'][c]:>20.3f}" for c in lowest))
        print(f"saved {save('closed_routes-pooling', {'annotation': str(args.pooling), **result})}")
        return result
    if not args.run:
        parser.error("give --run (hashing probes) or --pooling (encoder probe)")
    from bench.train_quality import parse_set

    skip = {s for s in args.skip.split(",") if s}
    seeds = parse_seeds(args.seeds)
    settings = parse_set(args.set)
    rows, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="duch-routes-") as scratch:
        (Path(scratch) / "extract").symlink_to((Path(args.run) / "extract").resolve())
        setup = None
        for seed in seeds:
            cfg = TrainConfig.recipe(args.recipe, run=scratch, seed=seed, device="cpu", **settings)
            cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, torch.device("cpu")))
            setup = setup or Setup(Path(scratch), cfg)
            rows.append(one_seed(setup, cfg, args.bits, args.nested_from, skip))
            print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    summary = summarise(rows, args.bits, args.nested_from)
    print_summary(summary, args.bits, seeds)
    path = save(f"closed_routes-{args.bits}", {"run": args.run, "bits": args.bits, "seeds": seeds,
                                               "nested_from": args.nested_from, "recipe": args.recipe,
                                               "settings": settings,
                                               "skip": sorted(skip), "summary": summary, "per_seed": rows})
    print(f"saved {path}")
    return summary


if __name__ == "__main__":
    main()

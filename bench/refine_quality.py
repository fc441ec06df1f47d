"""Refine with examples on real UCM: P@100 of a caption query before and after one (and two) rounds of feedback.

    python bench/refine_quality.py --run runs/ucm --seeds 0-4          # seed 0: RUN's own heads
    python bench/refine_quality.py --latency-only --n 1000000

For each of the 21 classes: a caption query (the first caption the paper split's query part holds for an image of
that class: an image the heads never trained on), its top 24 images marked right or wrong by their class label
(the label stands in for the user), the query refined with them (retrieval/refine.py: Rocchio over the heads'
continuous outputs, the caption's kept), and P@100 of the refined ranking (each class has 100 images). Round two
marks the refined ranking's top 24 as well (the marks of both rounds, the caption's query). P@100 counts the whole
ranking (marked images included: they are found images); `residual` counts the ranking without the marked
images (exclude_marked), the usual measure of feedback that does not credit showing the user what they marked.
The archive is searched whole (2100 images), 64 bits, adaptive ties, as `duch serve` does by default.

Seeds: seed 0 is RUN's own train-hash (the main job); seed s > 0 trains the same defaults at 64 bits with
--seed s in SCRATCH/seed-s (extract linked, never copied) and encodes with --continuous, once (kept for reruns).
Mean over classes per seed, then mean over seeds with a 95 % CI (bench/compare_quality.difference_test: paired
across seeds for the gains). A grid of Rocchio weights is measured the same way. Latency: a refined query (24
examples' lookups, their continuous outputs read from the memory-mapped code file, Rocchio, the sign code) and a
plain one, over N synthetic 64-bit codes with continuous outputs, the same scan (faiss flat when installed, else
numpy; adaptive ties), median of --repeats each, side by side in one process.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import parse_seeds, save  # noqa: E402
from bench.compare_quality import difference_test  # noqa: E402
from bench.search_latency import median_ms  # noqa: E402

BITS = 64
MARK = 24  # one page of the search page
DEPTH = 100  # P@100: a UCM class has 100 images
GRID = [(1.0, 1.0, 0.25), (1.0, 0.75, 0.15), (1.0, 1.0, 0.0), (1.0, 0.5, 0.25), (1.0, 2.0, 0.5), (1.0, 2.0, 0.0),
        (1.0, 1.0, 1.0), (0.0, 1.0, 0.25)]


def seed_run(run: Path, scratch: Path, seed: int) -> Path:
    """The run holding seed `seed`'s heads and codes: RUN for seed 0, else SCRATCH/seed-N (made once)."""
    if seed == 0:
        return run
    from duch.pipeline.config import EncodeConfig, TrainConfig
    from duch.stages.encode_archive import encode_archive
    from duch.stages.train_hash import train_hash

    out = scratch / f"seed-{seed}"
    if (out / "encode-archive" / "manifest.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "extract").exists():
        (out / "extract").symlink_to((run / "extract").resolve())
    t = time.perf_counter()
    train_hash(TrainConfig(run=str(out), bits=(BITS,), seed=seed), progress=False, echo=lambda _: None)
    encode_archive(EncodeConfig(run=str(out), bits=(BITS,), continuous=True), progress=False, echo=lambda _: None)
    print(f"seed {seed}: trained and encoded in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def class_captions(run: Path, index, draw: int = 0) -> dict[str, str]:
    """For each class, the evaluation caption of a query-split image of that class: the first (draw 0) or one
    drawn at random with seed `draw`."""
    split = json.loads((run / "train-hash" / "split.json").read_text())
    images, texts = index.tables["image"].meta, index.tables["text"].meta
    label = dict(zip(images["ids"].astype(str), images["label"].astype(str)))
    caption = {(str(i), int(c)): str(t) for i, c, t in zip(texts["image_id"], texts["caption_index"], texts["text"])}
    query = set(split["query"])
    by_class: dict[str, list[str]] = {}
    for image_id, c in split["eval_caption"]:
        if image_id in query:
            by_class.setdefault(label[image_id], []).append(caption[(image_id, int(c))])
    rng = np.random.default_rng(draw)
    return {cls: texts[0] if draw == 0 else texts[int(rng.integers(len(texts)))]
            for cls, texts in sorted(by_class.items())}


def precision(hits, cls: str, depth: int = DEPTH) -> float:
    return sum(h.label == cls for h in hits[:depth]) / depth


def unseen_rows(run: Path, index) -> np.ndarray:
    """[N] bool: the images the heads never trained on (the split's query and database parts)."""
    train = set(json.loads((run / "train-hash" / "split.json").read_text())["train"])
    return ~np.isin(index.tables["image"].meta["ids"].astype(str), list(train))


def one_class(index, cls: str, query, weights, where=None, depth: int = DEPTH) -> dict:
    """P@100 before, after one round and after two, and the residual P@100 (marked images left out). `query`: the
    caption coded once (Index.search's first half); each ranking is Index.search's second half, as it runs it.
    `where`: the images searched (a filter before the top k); `depth`: P@depth."""
    from duch.pipeline.retrieval.refine import ROCCHIO, Feedback

    weights = weights or ROCCHIO
    k = depth + 2 * MARK  # the residual ranking of two rounds reaches this deep
    before = index.rank(query, k, "image", where=where)
    out = {"before": precision(before, cls, depth)}
    marked_pos: list[str] = []
    marked_neg: list[str] = []
    shown = before
    for round_ in (1, 2):
        new = [h for h in shown if h.id not in marked_pos + marked_neg][:MARK]
        marked_pos += [h.id for h in new if h.label == cls]
        marked_neg += [h.id for h in new if h.label != cls]
        marked = set(marked_pos + marked_neg)
        if round_ == 1:
            out["residual_before"] = precision([h for h in before if h.id not in marked], cls, depth)
        feedback = Feedback.parse(marked_pos, marked_neg, weights)
        after = index.rank(index.refine(query, feedback), k, "image", where=where)
        out[f"round{round_}"] = precision(after, cls, depth)
        out[f"residual_round{round_}"] = precision([h for h in after if h.id not in marked], cls, depth)
        out[f"marked_right_round{round_}"] = len(marked_pos)
        shown = after
    return out


def quality(runs: dict[int, Path], draws: list[int], weights_grid, unseen: bool = False,
            caption: str | None = None) -> dict:
    """Per (training seed, caption draw): each class's P@100s, for each weights of the grid."""
    from duch.pipeline.retrieval.queries import Query
    from duch.pipeline.retrieval.search import Index

    per_seed: dict = {}
    for (train_seed, run), draw in ((r, d) for r in runs.items() for d in draws):
        index = Index.load(run, bits=BITS, device="cpu")
        captions = class_captions(run, index, draw)
        if caption is not None:  # one vague caption for every class: the marks alone say which class is wanted
            captions = dict.fromkeys(captions, caption)
        seed = f"{train_seed}/{draw}"
        per_seed[seed] = {"train_seed": train_seed, "draw": draw, "captions": captions, "weights": {}}
        texts = index.coder.embed_text(list(captions.values()))
        coded = {cls: Query.of("text", h) for cls, h in zip(captions, texts)}
        where, depths = None, {}
        if unseen:  # R-precision among the unseen images: P@(the class's unseen images)
            where = unseen_rows(run, index)
            labels = index.tables["image"].meta["label"].astype(str)[where]
            depths = {cls: int((labels == cls).sum()) for cls in captions}
        for weights in weights_grid:
            t = time.perf_counter()
            rows = {cls: one_class(index, cls, coded[cls], weights, where, depths.get(cls, DEPTH)) for cls in captions}
            per_seed[seed]["weights"][",".join(f"{w:g}" for w in weights)] = rows
            mean = {key: float(np.mean([r[key] for r in rows.values()])) for key in next(iter(rows.values()))}
            print(f"seed {seed} weights {weights}: P@100 {mean['before']:.3f} -> {mean['round1']:.3f} -> "
                  f"{mean['round2']:.3f} (residual {mean['residual_before']:.3f} -> {mean['residual_round1']:.3f}"
                  f" -> {mean['residual_round2']:.3f}) in {time.perf_counter() - t:.1f} s", flush=True)
    return per_seed


def summarise(per_seed: dict) -> dict:
    """Per weights: means over seeds with 95 % CIs of the class means, and of the gains (paired by seed)."""
    seeds = list(per_seed)
    out: dict = {}
    for key in per_seed[seeds[0]]["weights"]:
        means = {m: np.array([np.mean([r[m] for r in per_seed[s]["weights"][key].values()]) for s in seeds])
                 for m in ("before", "round1", "round2", "residual_before", "residual_round1", "residual_round2")}
        out[key] = {
            "p100_before": difference_test(0.0, means["before"]),
            "gain_round1": difference_test(means["before"], means["round1"], paired=True),
            "gain_round2": difference_test(means["before"], means["round2"], paired=True),
            "residual_gain_round1": difference_test(means["residual_before"], means["residual_round1"], paired=True),
            "residual_gain_round2": difference_test(means["residual_before"], means["residual_round2"], paired=True),
        }
    return out


def per_class(per_seed: dict, key: str) -> dict:
    seeds = list(per_seed)
    classes = list(per_seed[seeds[0]]["weights"][key])
    return {cls: {m: float(np.mean([per_seed[s]["weights"][key][cls][m] for s in seeds]))
                  for m in ("before", "round1", "round2")} for cls in classes}


def latency(n: int, repeats: int) -> dict:
    """Median ms of a plain and a refined query over n synthetic codes with continuous outputs (module doc)."""
    from duch.pipeline.formats import faiss_index
    from duch.pipeline.formats.codes import CodeWriter, open_codes
    from duch.pipeline.model.coding import pack_codes, unpack_codes
    from duch.pipeline.retrieval.hamming import hamming_topk
    from duch.pipeline.retrieval.ranking import adaptive_topk
    from duch.pipeline.retrieval.refine import ROCCHIO, refined_query

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "codes.h5"
        writer = CodeWriter(path, BITS, {"image": n}, continuous=True, attrs={})
        for s in range(0, n, 1 << 18):
            m = min(1 << 18, n - s)
            h = rng.uniform(-1, 1, (m, BITS)).astype(np.float16)
            writer.append("image", {"codes": pack_codes(h), "continuous": h, "ids": np.arange(s, s + m).astype(str),
                                    "path": [""] * m, "label": [""] * m})
        writer.close()
        table = open_codes(path)[1]["image"]
        codes = np.asarray(table.codes[:])
        index = faiss_index.build(codes, "flat") if faiss_index.installed() else None
        backend = "faiss flat" if index is not None else "numpy"
        query = rng.uniform(-1, 1, BITS).astype(np.float32)
        marked = [str(i) for i in rng.choice(n, MARK, replace=False)]
        _ = table.row_of  # built once when the archive is opened, as the service does

        def scan(h):
            packed = pack_codes(h[None])
            fn = ((lambda k: tuple(a[0] for a in index.search(packed, k))) if index is not None
                  else (lambda k: tuple(a[0] for a in hamming_topk(packed, codes, k))))
            return adaptive_topk(fn, codes, h, 10)

        def refined():
            rows = np.sort([table.row_of[i] for i in marked])
            pos, neg = rows[:MARK // 2], rows[MARK // 2:]
            cont = lambda r: np.asarray(table.continuous[r], np.float32)  # noqa: E731
            bits = lambda r: unpack_codes(np.asarray(table.codes[r]), BITS)  # noqa: E731
            h, _ = refined_query(query, None, cont(pos), cont(neg), bits(pos), bits(neg), ROCCHIO)
            return scan(h)

        plain_ms, refined_ms = median_ms(lambda: scan(query), repeats), median_ms(refined, repeats)
        return {"n": n, "bits": BITS, "k": 10, "examples": MARK, "backend": backend, "repeats": repeats,
                "plain_ms": plain_ms, "refined_ms": refined_ms, "ratio": refined_ms / plain_ms}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="/work/runs/ucm", help="the main job's run (seed 0's heads and codes)")
    parser.add_argument("--scratch", default=None, help="where seeds > 0 are trained [default: RUN-refine-seeds]")
    parser.add_argument("--seeds", default="0-4", help="training seeds (0: RUN's own heads)")
    parser.add_argument("--draws", default="0", help="caption draws per class (0: the first query image's)")
    parser.add_argument("--grid", action="store_true", help="also measure the grid of Rocchio weights")
    parser.add_argument("--caption", default=None, help="one caption for every class instead of the class's own")
    parser.add_argument("--unseen", action="store_true",
                        help="search only the images the heads never trained on; R-precision instead of P@100")
    parser.add_argument("--n", type=int, default=1_000_000, help="synthetic codes for the latency")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--latency-only", action="store_true")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--prepare-only", action="store_true", help="train and encode the seeds > 0, then stop")
    args = parser.parse_args(argv)
    payload: dict = {}
    if args.prepare_only:
        for seed in parse_seeds(args.seeds):
            seed_run(Path(args.run), Path(args.scratch or f"{args.run}-refine-seeds"), seed)
        return payload
    if not args.latency_only:
        from duch.pipeline.retrieval.refine import ROCCHIO

        run = Path(args.run)
        scratch = Path(args.scratch or f"{run}-refine-seeds")
        runs = {seed: seed_run(run, scratch, seed) for seed in parse_seeds(args.seeds)}
        grid = GRID if args.grid else [ROCCHIO]
        per_seed = quality(runs, parse_seeds(args.draws), grid, args.unseen, args.caption)
        summary = summarise(per_seed)
        default = ",".join(f"{w:g}" for w in ROCCHIO)
        print(f"\n{'weights a,b,g':<16}{'P@100 before':>22}{'gain 1 round':>26}{'gain 2 rounds':>26}"
              f"{'residual gain 1':>26}")
        for key, s in summary.items():
            cells = [f"{s['p100_before']['other']:.3f} [{s['p100_before']['ci95'][0]:.3f},"
                     f"{s['p100_before']['ci95'][1]:.3f}]"]
            for name in ("gain_round1", "gain_round2", "residual_gain_round1"):
                g = s[name]
                cells.append(f"{g['difference']:+.3f} [{g['ci95'][0]:+.3f},{g['ci95'][1]:+.3f}]")
            print(f"{key:<16}" + "".join(f"{c:>26}" if i else f"{c:>22}" for i, c in enumerate(cells)))
        classes = per_class(per_seed, default)
        print(f"\nper class, weights {default}, mean over seeds: P@100 before -> 1 round -> 2 rounds")
        for cls, r in classes.items():
            print(f"  {cls:<20}{r['before']:.3f} -> {r['round1']:.3f} -> {r['round2']:.3f}")
        payload.update(run=str(run), seeds=list(runs), draws=parse_seeds(args.draws), bits=BITS, unseen=args.unseen,
                       caption=args.caption,
                       marked_per_round=MARK, depth="R (the class's unseen images)" if args.unseen else DEPTH,
                       default_weights=list(ROCCHIO), summary=summary, per_class=classes, per_seed=per_seed)
    if args.no_latency:
        print(f"saved {save('refine_quality', payload)}")
        return payload
    lat = latency(args.n, args.repeats)
    print(f"\nlatency over {lat['n']:,} x {BITS}-bit codes ({lat['backend']}, k 10, adaptive ties): plain "
          f"{lat['plain_ms']:.1f} ms, refined with {MARK} examples {lat['refined_ms']:.1f} ms "
          f"(x{lat['ratio']:.2f}), medians of {args.repeats}")
    payload["latency"] = lat
    path = save("refine_quality", payload)
    print(f"saved {path}")
    return payload


if __name__ == "__main__":
    main()

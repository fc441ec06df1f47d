"""Is one train-hash setting better than another, or than a bar, beyond seed noise?

    python bench/compare_quality.py BASE.json OTHER.json                 # two bench/train_quality.py results
    python bench/compare_quality.py RESULT.json --bar straightforward    # against the figures issue 2 set as the bar
    python bench/compare_quality.py RESULT.json --bar published          # against published DUCH (I->T, T->I)
    python bench/compare_quality.py BASE.json OTHER.json --ties adaptive --definition textbook

For every code length and direction the files share: each side's mean mAP over its seeds, the difference (OTHER -
BASE, or RESULT - bar), its 95 % confidence interval and the two-sided p-value of a t-test. Two files that ran the
same seeds are compared seed by seed (paired: every seed shares the split, and a seed fixes the heads' start and
the batch order), others by Welch's test; a bar is a fixed figure (one-sample test). With 3 seeds only a
difference of about three standard deviations of the seed noise shows; the test says how sure a table's gap is,
not what causes it. Prints the table and writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import save  # noqa: E402
from duch.pipeline.retrieval.metrics import DIRECTIONS  # noqa: E402

# Reference mAP@20 on UCM-captions, paper split, at 16 / 32 / 64 / 128 bits.
BARS = {
    # Issue 2's bar: a straightforward re-implementation on the default offline encoders (one augmented view, a
    # second caption as the text view, tau 1, 100 epochs).
    "straightforward": {"I->T": (.915, .949, .954, .944), "T->I": (.984, .991, .992, .990),
                        "I->I": (.901, .935, .944, .936), "T->T": (.991, .994, .995, .993)},
    # DUCH as published (ICASSP 2022, ResNet18 + BERT features).
    "published": {"I->T": (.760, .794, .844, .870), "T->I": (.799, .851, .916, .927)},
}
BAR_BITS = ("16", "32", "64", "128")


def difference_test(base: np.ndarray | float, other: np.ndarray, paired: bool = False) -> dict:
    """Mean of each side, other - base, its 95 % confidence interval and the two-sided p-value: a paired t-test
    (base and other seed by seed), Welch's t-test (two samples), or a one-sample test when `base` is a number (a
    bar). NaN where there is no spread to test against (one seed, or every seed equal on both sides)."""
    b = np.asarray(other, np.float64)
    if np.ndim(base) == 0:
        bar = float(base)
        a_mean, test, shift = bar, "one-sample", -bar
        result = stats.ttest_1samp(b, bar) if len(b) > 1 and np.ptp(b) > 0 else None
    else:
        a = np.asarray(base, np.float64)
        if paired and len(a) != len(b):
            raise ValueError(f"paired samples need equal counts, got {len(a)} and {len(b)}")
        a_mean, test, shift = a.mean(), "paired" if paired else "welch", 0.0
        if paired:
            result = stats.ttest_rel(b, a) if len(a) > 1 and np.ptp(b - a) > 0 else None
        else:
            spread = len(a) > 1 and len(b) > 1 and (np.ptp(a) > 0 or np.ptp(b) > 0)
            result = stats.ttest_ind(b, a, equal_var=False) if spread else None
    if result is None:
        low = high = p = math.nan
    else:
        ci = result.confidence_interval(0.95)  # of the mean difference; of the mean itself for one sample
        low, high, p = float(ci.low) + shift, float(ci.high) + shift, float(result.pvalue)
    return {"base": float(a_mean), "other": float(b.mean()), "difference": float(b.mean() - a_mean),
            "ci95": [low, high], "p": p, "test": test}


def per_seed(result: dict, ties: str, definition: str) -> dict[str, dict[str, np.ndarray]]:
    """{bits: {direction: [seeds]}} from a bench/train_quality.py JSON."""
    key = {"order": "per_seed", "adaptive": "per_seed_adaptive"}[ties]
    if "per_seed" not in result:
        raise SystemExit("not a bench/train_quality.py result: it has no per-seed figures ('per_seed')")
    if key not in result:
        raise SystemExit(f"the result file has no {key!r} (saved before query-adaptive ties were measured); "
                         "use --ties order")
    runs = result[key]
    return {b: {d: np.array([r[b][d][definition] for r in runs]) for d in DIRECTIONS if d in runs[0][b]}
            for b in runs[0]}


def compare(base: dict, other: dict | str, ties: str = "order", definition: str = "reference") -> dict:
    """{bits: {direction: difference_test}} for two result files, or for one against a bar of BARS."""
    a = per_seed(base, ties, definition)
    out = {}
    if isinstance(other, str):
        bar = BARS[other]
        for b, dirs in a.items():
            if b in BAR_BITS:
                out[b] = {d: difference_test(bar[d][BAR_BITS.index(b)], v) for d, v in dirs.items() if d in bar}
        return out
    o = per_seed(other, ties, definition)
    paired = base.get("seeds") is not None and base.get("seeds") == other.get("seeds")
    for b in (b for b in a if b in o):
        out[b] = {d: difference_test(a[b][d], o[b][d], paired) for d in DIRECTIONS if d in a[b] and d in o[b]}
    return out


def short_name(path: str, result: dict) -> str:
    """A result's label as train_quality.py was given it (`--label`), else its file name."""
    name = result.get("benchmark") or Path(path).stem
    return name.removeprefix("train_quality-")


def _cell(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:+.3f}"


def format_table(rows: dict, base_name: str, other_name: str) -> str:
    lines = [f"| bits | direction | {base_name} | {other_name} | difference | 95 % CI | p | test |",
             "|---|---|---|---|---|---|---|---|"]
    for b, dirs in rows.items():
        for d, r in dirs.items():
            low, high = r["ci95"]
            p = "-" if math.isnan(r["p"]) else "<.001" if r["p"] < 0.001 else f"{r['p']:.3f}"
            lines.append(f"| {b} | {d} | {r['base']:.3f} | {r['other']:.3f} | {r['difference']:+.3f} | "
                         f"{_cell(low)} to {_cell(high)} | {p} | {r['test']} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="a bench/train_quality.py result JSON")
    parser.add_argument("other", nargs="?", help="a second result JSON (or give --bar)")
    parser.add_argument("--bar", choices=sorted(BARS), help="compare BASE against fixed figures instead")
    parser.add_argument("--ties", choices=("order", "adaptive"), default="order",
                        help="equal Hamming distances in database order (published protocol) or query-adaptive")
    parser.add_argument("--definition", choices=("reference", "textbook"), default="reference")
    parser.add_argument("--label", default=None, help="name of the saved JSON (default: from the inputs)")
    args = parser.parse_args(argv)
    if (args.other is None) == (args.bar is None):
        parser.error("give either a second result file or --bar")

    def read(path: str) -> dict:
        try:
            return json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"{path}: not a readable result JSON ({e})") from None

    base = read(args.base)
    other = read(args.other) if args.other else None
    rows = compare(base, args.bar or other, args.ties, args.definition)
    if not rows:
        raise SystemExit("the inputs share no code length")
    # A bar is the base: the difference is always the second column minus the first.
    names = ((f"{args.bar} bar", short_name(args.base, base)) if args.bar
             else (short_name(args.base, base), short_name(args.other, other)))
    print(f"mAP@20 {args.definition}, ties {args.ties}: {names[1]} against {names[0]}")
    print(format_table(rows, *names))
    pair = f"{short_name(args.base, base)}-vs-{args.bar or short_name(args.other, other)}"
    label = args.label or "-".join([pair] + [args.ties] * (args.ties != "order")
                                   + [args.definition] * (args.definition != "reference"))
    path = save(f"compare_quality-{label}", {"base": args.base, "other": args.bar or args.other,
                                             "ties": args.ties, "definition": args.definition, "rows": rows})
    print(f"saved {path}")
    return rows


if __name__ == "__main__":
    main()

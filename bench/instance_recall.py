"""Instance-level Recall@1/5/10 on the dataset's official split, with and without re-ranking.

    python bench/instance_recall.py --run runs/ucm                 # 64 bits, seed 0
    python bench/instance_recall.py --run runs/ucm --bits 32,64 --seeds 0,1,2

Trains train-hash with --split dataset (UCM: train+val 1890 images; test 210 images and their 1050 captions)
in a scratch run that links RUN/extract (the user's own stages are never touched), encodes the archive with
continuous outputs, and evaluates: an image's own captions (I->T) and a caption's own image (T->I) by Hamming
ranking (ties in archive order, and by the query's confidence: query-adaptive), by a Hamming shortlist re-ranked
with the continuous outputs, and by the continuous outputs alone. Prints the table, mean over seeds, and writes
JSON to bench/results/.
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
from duch.pipeline.config import EncodeConfig, EvaluateConfig, TrainConfig  # noqa: E402
from duch.pipeline.retrieval.evaluation import RECALL_KS  # noqa: E402
from duch.stages.encode_archive import encode_archive  # noqa: E402
from duch.stages.evaluate import evaluate  # noqa: E402
from duch.stages.train_hash import train_hash  # noqa: E402

RANKINGS = ("hamming", "adaptive", "rerank", "continuous")
# The anchors on the same split (mean of I->T and T->I R@1/5/10, in %).
ANCHORS = {"straightforward hashing, 64 bits, Hamming": 36.4, "its continuous outputs, cosine": 47.4,
           "RemoteCLIP ViT-B-32 (dense)": 56.4}


def run_once(extract_dir: Path, bits: tuple[int, ...], seed: int, rerank: int) -> dict:
    quiet = lambda _: None  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="duch-bench-") as scratch:
        (Path(scratch) / "extract").symlink_to(extract_dir.resolve())
        train_hash_result = train_hash(
            TrainConfig(run=scratch, bits=bits, split="dataset", seed=seed, eval_every=10**6), progress=False,
            echo=quiet)
        encode_archive(EncodeConfig(run=scratch, continuous=True), progress=False, echo=quiet)
        metrics = evaluate(EvaluateConfig(run=scratch, rerank=rerank), echo=quiet).metrics
        metrics["train_seconds"] = {b: r["seconds"] for b, r in train_hash_result.manifest["results"].items()}
        return metrics


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory with a finished extract stage")
    parser.add_argument("--bits", default="64")
    parser.add_argument("--seeds", default="0", help="e.g. 0,1,2 or 0-9")
    parser.add_argument("--rerank", type=int, default=100, help="Hamming shortlist re-ranked by cosine")
    args = parser.parse_args(argv)
    bits = tuple(int(b) for b in args.bits.split(","))
    seeds = parse_seeds(args.seeds)
    t0 = time.perf_counter()
    runs = []
    for seed in seeds:
        runs.append(run_once(Path(args.run) / "extract", bits, seed, args.rerank))
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    table = {}
    for b in map(str, bits):
        table[b] = {}
        for name in RANKINGS:
            cells = {f"{d} R@{k}": float(np.mean([100 * r["results"][b]["instance"][name][d][k] for r in runs]))
                     for d in ("I->T", "T->I") for k in RECALL_KS}
            cells["mean"] = float(np.mean([100 * r["results"][b]["instance"][name]["mean_recall"] for r in runs]))
            table[b][name] = cells
    print(f"\ninstance-level Recall@K, {runs[0]['instance_items']}; mean of seeds {seeds}")
    columns = list(next(iter(table.values()))["hamming"])
    print(f"{'bits':<6}{'ranking':<12}" + "".join(f"{c:>11}" for c in columns))
    for b, rows in table.items():
        for name, cells in rows.items():
            print(f"{b:<6}{name:<12}" + "".join(f"{cells[c]:>11.1f}" for c in columns))
    print("anchors (mean R):", "; ".join(f"{k} {v}" for k, v in ANCHORS.items()))
    path = save("instance_recall", {"run": args.run, "bits": list(bits), "seeds": seeds, "rerank": args.rerank,
                                    "split": runs[0]["split"], "recall_percent": table, "anchors": ANCHORS,
                                    "per_seed": [r["results"] for r in runs]})
    print(f"saved {path}")
    return table


if __name__ == "__main__":
    main()

"""Raw-feature retrieval quality of an extract run: mAP@K with cosine similarity, paper protocol.

    python bench/extract_quality.py --run runs/ucm

Image->image over the image embeddings and text->text over one caption per image (drawn with the split's seed),
queries and database of the paper's split (seed 42: 50% train; of the rest 20% query, 80% database), relevance
= same class. Prints both mAP@K definitions, the three query classes each modality's raw features retrieve worst
(reference mAP@K per class; all classes in the JSON), and the extraction speed the run's manifest recorded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import save  # noqa: E402
from duch.data.splits import paper_split  # noqa: E402
from duch.pipeline.formats.features import load_features  # noqa: E402
from duch.pipeline.retrieval.metrics import average_precisions, per_class_mean, ranking  # noqa: E402


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    b = b.astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True) + 1e-12
    b /= np.linalg.norm(b, axis=1, keepdims=True) + 1e-12
    return a @ b.T


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory with a finished extract stage")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    f = load_features(args.run)
    if (f.labels == "").any():
        raise SystemExit("this benchmark needs class labels for every image")
    split = paper_split(len(f.ids), args.seed)
    labels = f.labels
    text = f.text_emb[f.one_caption_per_image(args.seed)]
    results, per_class = {}, {}
    for name, emb in (("I->I", f.image), ("T->T", text)):
        order = ranking(cosine(emb[split.query], emb[split.database]))
        aps = {d: average_precisions(order, labels[split.query], labels[split.database], args.k, d)
               for d in ("textbook", "reference")}
        results[name] = {d: float(ap.mean()) for d, ap in aps.items()}
        per_class[name] = per_class_mean(aps["reference"], labels[split.query])
    manifest = f.manifest
    speed = {k: manifest["timings"].get(k) for k in ("images_per_s", "captions_per_s", "images_s", "captions_s")}
    print(f"run {args.run}: {manifest['encoders']['image']['encoder']} / {manifest['encoders']['text']['encoder']}, "
          f"{len(f.ids)} images, split {len(split.train)}/{len(split.query)}/{len(split.database)}")
    print(f"{'direction':<10}{f'mAP@{args.k} textbook':>20}{f'mAP@{args.k} reference':>20}")
    for name, r in results.items():
        print(f"{name:<10}{r['textbook']:>20.4f}{r['reference']:>20.4f}")
    for name, classes in per_class.items():
        lowest = ", ".join(f"{c} {v:.3f}" for c, v in list(classes.items())[:3])
        print(f"{name} lowest classes (reference mAP@{args.k}): {lowest}")
    print(f"extraction speed (from the manifest, device {manifest['device']}): "
          f"{speed['images_per_s']} images/s (each with {manifest['counts']['image_views']} augmented views), "
          f"{speed['captions_per_s']} captions/s")
    path = save("extract_quality", {"run": args.run, "k": args.k, "split_seed": args.seed,
                                    "encoders": manifest["encoders"], "counts": manifest["counts"],
                                    "device": manifest["device"], "map": results, "map_per_class_reference": per_class,
                                    "extraction": speed})
    print(f"saved {path}")
    return results


if __name__ == "__main__":
    main()

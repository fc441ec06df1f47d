"""Rewrite bench/results/train_quality_experiments/README.md from the JSON files in that folder.

    python bench/experiments_table.py

Each file is one `bench/train_quality.py` run (an experiment's label, its settings, the seeds); a row per code
length gives its mean mAP@20 (reference definition) over those seeds. The settings are named against what the
run trained over: the paper's values (files without a `resolved` config, from before the recipes existed), the
current defaults, or the defaults of that hour (the `resolved` config says which values those were).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from duch.pipeline.config import TrainConfig  # noqa: E402
from duch.pipeline.retrieval.metrics import DIRECTIONS  # noqa: E402

FOLDER = Path(__file__).resolve().parent / "results" / "train_quality_experiments"

INTRO = """# train-hash experiments on UCM-captions (2026-11-24 to 25, 2-core CPU)

Made by `python bench/experiments_table.py` from the files here. Each file is one `bench/train_quality.py` run:
mean mAP@20 (reference definition) over its seeds, paper split. The settings are over the paper's (batch 256, 100
epochs, lr decay every 50, beta 0.001) where the file has no `resolved` entry; over the current `duch` defaults
(batch 128, 50 epochs, lr decay every 25, beta 0.01 x K/64) where its `resolved` config equals them; else over the
defaults of that hour, which its `resolved` config records (beta 0.01 at every code length, before it scaled with K).
`v4*` ran on an extract with 4 cached image views (`--image-views 4`). `default16-s345` is the defaults with seeds
3 to 5, to judge 16-bit seed noise. Options tried then removed, since none helped: `ema_decay` (an exponential
moving average of the heads' weights), `contrast_group` (NT-Xent negatives only within groups of that many items),
`w_decorrelation` (a penalty on the off-diagonal second moments h^T h / n of the image and text codes),
`w_nb_image` / `w_nb_text` with `neighbors` (each image also paired with the image, or a caption, of one of its
`neighbors` training items nearest by mean caption embedding; 96-98% of those share its class on UCM),
`tanh_scale` (the heads' tanh(s x), s raised from 1 to that value over the epochs: HashNet's continuation towards
binary outputs), and `w_semantic` with `semantic_floor` (DJSRH-style: the cosines of the batch's image-caption,
image-image and caption-caption code pairs regressed onto the cosines of the items' mean caption embeddings,
[floor, 1] mapped onto [0, 1], lower ones onto 0), and `inter_pair` (the (image, caption) NT-Xent on the mean of
the image's and its view's codes, `image_view_mean`, or that against the mean of the two captions' codes,
`both_view_means`: training as the view ensemble codes images). Tried as ad hoc patches, never options (their
files name the change as a setting): `hidden_dropout` / `input_dropout` (dropout after the heads' hidden layer, or
on their input features), `w_align` (both image codes regressed, squared error, onto the detached mean of the
item's two caption codes: text as the teacher), and `target=captions` (the binary target B from the two caption
codes only, with the quantization weight unscaled). `default16-ens-s345` is the current defaults with seeds 3 to 5.
`*-s345` files repeat a setting with seeds 3 to 5. `ensemble-16-64` is the first with `view_ensemble` (an image's code
from the head's mean over the image and its 2 cached views), on by default since; every run before it coded
images from the image alone, as the paper does, and the files without a `resolved` config say so too.
Seconds are not comparable between files: some runs shared the 2 cores with other work.
"""


def over_what(data: dict, current: dict) -> str:
    resolved = data.get("resolved")
    if resolved is None:
        return "over the paper"
    tried = set(data["settings"]) | {"bits", "seed", "view_ensemble"}
    # A field newer than the file is the same when it is off (options are added off), else it changed behaviour.
    same = all(resolved[k] == v if k in resolved else not v for k, v in current.items() if k not in tried)
    # view_ensemble came on by default: the files from before it coded images from the image alone.
    alone = not data["settings"].get("view_ensemble", resolved.get("view_ensemble", False))
    return ("over the duch defaults" if same else "over the duch defaults then") + (
        ", image codes from the image alone" if alone and current["view_ensemble"] else "")


def rows() -> list[str]:
    current = json.loads(json.dumps(TrainConfig(run=".").output_settings()))
    out = []
    for path in sorted(FOLDER.glob("*.json")):
        data = json.loads(path.read_text())
        name = path.name.split("-cpu")[0]
        settings = ", ".join(f"{k}={v}" for k, v in data["settings"].items() if k != "bits")
        seeds = ",".join(str(s) for s in data["seeds"])
        for bits, per_direction in data["map"].items():
            cells = " | ".join(f"{per_direction[d]['reference']:.3f}" for d in DIRECTIONS)
            out.append(f"| {name} | {settings} ({over_what(data, current)}) | {seeds} | {bits} | {cells} |")
    return out


def main() -> Path:
    table = ["| file | settings | seeds | bits | " + " | ".join(DIRECTIONS) + " |", "|---" * 8 + "|", *rows()]
    readme = FOLDER / "README.md"
    readme.write_text(INTRO + "\n" + "\n".join(table) + "\n")
    print(f"wrote {readme} ({len(table) - 2} rows)")
    return readme


if __name__ == "__main__":
    main()

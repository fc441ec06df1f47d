"""`evaluate`: retrieval quality of an encoded run on its own held-out split, in the published tables' terms.

Class level (when items have labels): the run's query items against its database items, Hamming ranking with
ties in database order, for I->T, T->I, I->I, T->T: mAP@K under both definitions (pipeline/metrics.py),
precision@K, and precision/recall within every Hamming radius. Each image is represented on the text side by
the one caption train-hash drew for it (split.json), as in the paper's protocol.

Instance level: the query items' images against all their captions: Recall@1/5/10 of an image's own captions
(I->T) and of a caption's own image (T->I), by Hamming, by Hamming re-ranked with the continuous outputs
(`rerank` shortlist), and by the continuous outputs alone. With `train-hash --split dataset` the query items are
the dataset's official test split.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline import DuchError
from pipeline.codes import CodeTable, caption_key, codes_name, open_codes
from pipeline.config import EvaluateConfig, digest
from pipeline.hamming import hamming
from pipeline.hashing import unpack_codes
from pipeline.features import verify_listed
from pipeline.manifest import library_versions, now_iso, sha256_file, write_json_atomic, write_manifest
from pipeline.lock import run_lock
from pipeline.metrics import (DIRECTIONS, average_precisions, cosine, map_of_ranking, per_class_mean,
                              precision_at_k, query_adaptive_ranking, radius_curves, ranking, recall_at_k,
                              rerank_order, weighted_distances)
from pipeline.rundir import stage_dir
from pipeline.storage import write_errors

STAGE = "evaluate"
RECALL_KS = (1, 5, 10)


@dataclass
class Side:
    """The codes of one side (query or database) of one modality."""

    codes: np.ndarray  # packed [n, K/8]
    continuous: np.ndarray | None  # [n, K]
    labels: np.ndarray  # [n]
    image_ids: np.ndarray  # [n]

    def signs(self) -> np.ndarray:
        """The codes as +-1 [n, K]."""
        return unpack_codes(self.codes, self.codes.shape[1] * 8)


def _side(table: CodeTable, rows: np.ndarray, labels: np.ndarray, image_ids: np.ndarray) -> Side:
    cont = None if table.continuous is None else np.asarray(table.continuous[rows], np.float32)
    return Side(np.asarray(table.codes[rows]), cont, labels, image_ids)


def _rows(keys: list[str], index: dict[str, int], what: str, run: Path) -> np.ndarray:
    missing = [k for k in keys if k not in index]
    if missing:
        raise DuchError(f"{run}: {len(missing)} {what} of the split have no code (e.g. {missing[0]!r}); the codes "
                        "come from another archive: rerun `duch encode-archive --force`")
    return np.array([index[k] for k in keys], dtype=np.int64)


def gather(tables: dict[str, CodeTable], split: dict, run: Path) -> dict:
    """Query/database sides per modality for class level, and the instance-level sets, from split.json."""
    images = tables["image"].meta
    image_row, text_row = tables["image"].row_of, tables["text"].row_of
    labels = np.asarray(images["label"]).astype(str)
    text = tables["text"].meta
    eval_caption = {str(i): caption_key(i, c) for i, c in split["eval_caption"] or []}
    out = {}
    for side in ("query", "database"):
        ids = [str(i) for i in split[side]]
        img = _rows(ids, image_row, "images", run)
        cap = _rows([eval_caption.get(i, f"{i}#?") for i in ids], text_row, "captions", run)
        out[side] = {"I": _side(tables["image"], img, labels[img], np.array(ids)),
                     "T": _side(tables["text"], cap, labels[img], np.array(ids))}
    # Instance level: the query images and every real caption of theirs.
    query_ids = set(map(str, split["query"]))
    caption_rows = np.array([r for r, i in enumerate(text["image_id"]) if str(i) in query_ids], dtype=np.int64)
    caption_images = np.asarray(text["image_id"])[caption_rows].astype(str)
    img_rows = _rows([str(i) for i in split["query"]], image_row, "images", run)
    caption_labels = labels[[image_row[i] for i in caption_images]] if len(caption_rows) else labels[:0]
    out["instance"] = {"I": _side(tables["image"], img_rows, labels[img_rows], np.array(split["query"]).astype(str)),
                       "T": _side(tables["text"], caption_rows, caption_labels, caption_images)}
    return out


def class_metrics(sides: dict, bits: int, k: int, shortlist: int, ks: list[int]) -> dict:
    out = {}
    for direction in DIRECTIONS:
        src, dst = direction.split("->")
        q, db = sides["query"][src], sides["database"][dst]
        d = hamming(q.codes, db.codes).astype(np.int32)  # signed: negated as scores below
        order = ranking(-d)
        curves = radius_curves(d, q.labels, db.labels, bits)
        aps = {definition: average_precisions(order, q.labels, db.labels, k, definition)
               for definition in ("reference", "textbook")}
        entry = {
            "map": {definition: float(values.mean()) for definition, values in aps.items()},
            # Lowest first: the classes a user should look at (on UCM, medium- against dense-residential).
            "map_per_class": {definition: per_class_mean(values, q.labels) for definition, values in aps.items()},
            "precision_at_k": {"k": ks, "precision": precision_at_k(-d, q.labels, db.labels, ks).tolist()},
            "radius": {name: curve.tolist() for name, curve in curves.items()},
            "precision_within_radius": {str(r): float(curves["precision_all"][r]) for r in range(min(3, bits) + 1)},
        }
        if q.continuous is not None:  # the query's confidence orders equal distances: the database stays binary
            adaptive = query_adaptive_ranking(d, weighted_distances(q.continuous, db.signs()))
            entry["map_adaptive"] = {definition: map_of_ranking(adaptive, q.labels, db.labels, k, definition)
                                     for definition in ("reference", "textbook")}
        if shortlist and q.continuous is not None and db.continuous is not None:
            reranked = rerank_order(d, cosine(q.continuous, db.continuous), shortlist)
            entry["map_rerank"] = {definition: map_of_ranking(reranked, q.labels, db.labels, k, definition)
                                   for definition in ("reference", "textbook")}
        out[direction] = entry
    return out


def instance_metrics(sides: dict, shortlist: int) -> dict:
    images, captions = sides["instance"]["I"], sides["instance"]["T"]
    positive = captions.image_ids[None, :] == images.image_ids[:, None]  # [images, captions]
    d = hamming(images.codes, captions.codes).astype(np.int32)  # signed: negated as scores below
    orders = {"hamming": (ranking(-d), ranking(-d.T))}
    if images.continuous is not None and captions.continuous is not None:
        orders["adaptive"] = (query_adaptive_ranking(d, weighted_distances(images.continuous, captions.signs())),
                              query_adaptive_ranking(d.T, weighted_distances(captions.continuous, images.signs())))
    if shortlist and images.continuous is not None and captions.continuous is not None:
        sim = cosine(images.continuous, captions.continuous)
        orders["rerank"] = (rerank_order(d, sim, shortlist), rerank_order(d.T, sim.T, shortlist))
        orders["continuous"] = (ranking(sim), ranking(sim.T))
    out = {"images": len(images.codes), "captions": len(captions.codes)}
    for name, (i2t, t2i) in orders.items():
        row = {"I->T": recall_at_k(i2t, positive, RECALL_KS), "T->I": recall_at_k(t2i, positive.T, RECALL_KS)}
        row["mean_recall"] = float(np.mean([v for r in row.values() for v in r.values()]))
        out[name] = row
    return out


def p_at_k_grid(n: int) -> list[int]:
    grid = [1, 5, 10, 20, 30, 40, 50, 75, 100, 200, 500, 1000, 2000, 5000, 10000]
    return [k for k in grid if k < n] + [n]


# ---------------------------------------------------------------------------------------------- reporting
def _cell(value: float) -> str:
    """The published tables' style: .935, and 1.00 for a perfect score."""
    return "1.00" if value >= 0.9995 else f"{value:.3f}"[1:]


def _lowest_classes(per_class: dict[str, float], most: int = 3) -> str:
    """The `most` lowest classes that miss anything (per_class is lowest first), or "all 1.00"."""
    missed = [f"{name} {_cell(value)}" for name, value in per_class.items() if _cell(value) != "1.00"][:most]
    return ", ".join(missed) or "all 1.00"


def image_code_label(views: int) -> str:
    return (f"image codes: mean over each image and its {views} augmented views" if views else
            "image codes: from the image alone")


def format_tables(results: dict, k: int, split: dict, instance_label: str, image_views: int = 0) -> str:
    bits = sorted(results, key=int)
    head = " / ".join(bits)
    has_class = any(results[b].get("class") for b in bits)
    lines = []
    if has_class:
        q, db, tr = len(split["query"]), len(split["database"]), len(split["train"])
        lines.append(f"mAP@{k}, Hamming ranking ({split['mode']} split: {tr} train / {q} query / {db} database; "
                     f"{image_code_label(image_views)})")
        for pair in (("I->T", "T->I"), ("I->I", "T->T")):
            lines.append(f"| method | {pair[0]} {head} bits | {pair[1]} {head} bits |")
            lines.append("|---|---|---|")
            for key, name in (("map", "duch"), ("map_adaptive", "duch, query-adaptive ties"),
                              ("map_rerank", "duch + rerank")):
                for definition in ("reference", "textbook"):
                    if not all(key in results[b]["class"][pair[0]] for b in bits):
                        continue
                    cells = [" / ".join(_cell(results[b]["class"][d][key][definition]) for b in bits) for d in pair]
                    lines.append(f"| {name} ({definition} mAP@{k}) | {cells[0]} | {cells[1]} |")
            lines.append("")
        lines.append("precision within Hamming radius 2 (empty result = 0)")
        lines.append("| bits | " + " | ".join(DIRECTIONS) + " |")
        lines.append("|---|" + "---|" * len(DIRECTIONS))
        for b in bits:
            cells = " | ".join(f"{results[b]['class'][d]['precision_within_radius'].get('2', 0):.3f}"
                               for d in DIRECTIONS)
            lines.append(f"| {b} | {cells} |")
        lines.append("")
        lines.append(f"lowest query classes by reference mAP@{k} (class: its queries' mean AP)")
        lines.append("| bits | " + " | ".join(DIRECTIONS) + " |")
        lines.append("|---|" + "---|" * len(DIRECTIONS))
        for b in bits:
            per_class = {d: results[b]["class"][d]["map_per_class"]["reference"] for d in DIRECTIONS}
            cells = " | ".join(_lowest_classes(per_class[d]) for d in DIRECTIONS)
            lines.append(f"| {b} | {cells} |")
        lines.append("")
    lines.append(f"instance-level Recall@K ({instance_label})")
    lines.append("| bits | ranking | I->T R@1 | R@5 | R@10 | T->I R@1 | R@5 | R@10 | mean |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for b in bits:
        inst = results[b]["instance"]
        for name in ("hamming", "adaptive", "rerank", "continuous"):
            if name not in inst:
                continue
            r = inst[name]
            cells = " | ".join(f"{100 * r[d][kk]:.1f}" for d in ("I->T", "T->I") for kk in RECALL_KS)
            lines.append(f"| {b} | {name} | {cells} | {100 * r['mean_recall']:.1f} |")
    return "\n".join(lines)


def plot_curves(out_dir: Path, results: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = sorted((b for b in results if results[b].get("class")), key=int)
    if not bits:
        return []
    paths = []
    for name, title in (("pr_curves.png", "precision-recall over Hamming radius"),
                        ("precision_at_k.png", "precision@K")):
        fig, axes = plt.subplots(1, len(DIRECTIONS), figsize=(4.2 * len(DIRECTIONS), 3.8), sharey=True)
        for ax, direction in zip(axes, DIRECTIONS):
            for b in bits:
                m = results[b]["class"][direction]
                if name == "pr_curves.png":
                    ax.plot(m["radius"]["recall"], m["radius"]["precision"], marker=".", label=f"{b} bits")
                    ax.set(xlabel="recall", xlim=(0, 1.02))
                else:
                    ax.plot(m["precision_at_k"]["k"], m["precision_at_k"]["precision"], marker=".", label=f"{b} bits")
                    ax.set(xlabel="K", xscale="log")
            ax.set(title=direction, ylim=(0, 1.02))
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("precision")
        axes[-1].legend()
        fig.suptitle(title)
        fig.tight_layout()
        path = out_dir / name
        with write_errors(path):
            fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- the stage
@dataclass
class EvaluateResult:
    stage_dir: Path
    metrics: dict
    table: str
    plots: list[Path]


def evaluate(cfg: EvaluateConfig, progress: bool = True, echo: Callable[[str], None] = print) -> EvaluateResult:
    cfg.validate()
    with run_lock(cfg.run, STAGE):
        return _evaluate(cfg, echo)


def _evaluate(cfg: EvaluateConfig, echo: Callable[[str], None]) -> EvaluateResult:
    from stages.encode_archive import archive_views, image_code, load_encode_manifest, load_model_run

    run = Path(cfg.run)
    t0 = time.perf_counter()
    model_run = load_model_run(run)
    codes_dir, encoded = load_encode_manifest(run)
    split_path = stage_dir(run, "train-hash") / "split.json"
    split = json.loads(split_path.read_text())
    if not split["query"]:
        raise DuchError(f"{run} was trained with --split all: there is no held-out query set to evaluate on")
    image_views = int(image_code(encoded)["views"])
    if image_views != archive_views(model_run, model_run.extract):
        # The same weights under another view_ensemble setting: the codes follow the rule they were made by.
        made = f"averaged over {image_views} augmented views" if image_views else "from the images alone"
        raise DuchError(f"{codes_dir}: the image codes were made {made}, but the model's view_ensemble setting "
                        f"codes images otherwise; run `duch encode-archive --run {run}` first")
    bits_list = list(cfg.bits or [int(b) for b in encoded["models"]])
    results = {}
    for bits in bits_list:
        model = model_run.models.get(bits)
        made_by = encoded["models"].get(str(bits), {}).get("sha256")
        if model is None or made_by != model.sha256 or encoded["basis"]["archive"] != model_run.extract["fingerprint"]:
            raise DuchError(f"{codes_dir}: the {bits}-bit codes were not made by this run's model from this run's "
                            f"archive; run `duch encode-archive --run {run}` first")
        attrs, tables = open_codes(verify_listed(codes_dir, encoded, codes_name(bits)))
        if "text" not in tables:
            raise DuchError(f"{run}: the archive has no captions; evaluate needs image-caption pairs")
        sides = gather(tables, split, run)
        labelled = all(str(label) for label in sides["query"]["I"].labels) and all(
            str(label) for label in sides["database"]["I"].labels)
        n_db = len(split["database"])
        results[str(bits)] = {
            "class": class_metrics(sides, bits, cfg.k, cfg.rerank, p_at_k_grid(n_db)) if labelled else None,
            "instance": instance_metrics(sides, cfg.rerank),
        }
    instance_label = (f"{split['mode']} split's {'test' if split['mode'] == 'dataset' else 'query'} items: "
                      f"{len(split['query'])} images and their captions")
    table = format_tables(results, cfg.k, split, instance_label, image_views)
    out_dir = stage_dir(run, STAGE)
    with write_errors(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "manifest.json").unlink(missing_ok=True)
    metrics = {"k": cfg.k, "rerank": cfg.rerank, "split": {s: len(split[s]) for s in ("train", "query", "database")},
               "split_mode": split["mode"], "instance_items": instance_label, "image_views_averaged": image_views,
               "tie_break": "database order", "results": results}
    write_json_atomic(out_dir / "metrics.json", metrics)
    with write_errors(out_dir / "table.md"):
        (out_dir / "table.md").write_text(table + "\n")
    plots = plot_curves(out_dir, results)
    outputs = [{"file": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
               for p in [out_dir / "metrics.json", out_dir / "table.md", *plots]]
    write_manifest(out_dir, {
        "stage": STAGE, "created": now_iso(), "config": dataclasses.asdict(cfg), "versions": library_versions(),
        "basis": {"codes": encoded["fingerprint"], "settings": {"k": cfg.k, "rerank": cfg.rerank}},
        "fingerprint": digest({"codes": encoded["fingerprint"], "k": cfg.k, "rerank": cfg.rerank}),
        "outputs": outputs, "timings": {"total_s": round(time.perf_counter() - t0, 3)},
    })
    echo(table)
    echo(f"evaluate: metrics in {out_dir / 'metrics.json'}; plots: {', '.join(str(p) for p in plots) or 'none'}")
    return EvaluateResult(out_dir, metrics, table, plots)

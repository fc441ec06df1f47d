"""The evaluate stage's report: tables in the published layout (table.md) and the PR and precision@K plots."""
from __future__ import annotations

from pathlib import Path

from duch.pipeline.retrieval.evaluation import RECALL_KS
from duch.pipeline.retrieval.metrics import DIRECTIONS
from duch.pipeline.run.storage import atomic_write


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
                    both = [" / ".join(_cell(results[b]["class"][d][key][definition]) for b in bits) for d in pair]
                    lines.append(f"| {name} ({definition} mAP@{k}) | {both[0]} | {both[1]} |")
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
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
        plt.close(fig)
        paths.append(path)
    return paths

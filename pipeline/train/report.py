"""What a trained code length leaves for people: losses.csv, history.json, the losses plot, the mAP table."""
from __future__ import annotations

import csv
from pathlib import Path

from duch.pipeline.retrieval.metrics import DIRECTIONS
from duch.pipeline.run.manifest import write_json_atomic
from duch.pipeline.run.storage import atomic_write
from duch.pipeline.train.step import LOSS_TERMS


def write_history(folder: Path, history: list[dict], evals: list[dict], bits: int) -> None:
    with atomic_write(folder / "losses.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", *LOSS_TERMS])
        writer.writeheader()
        writer.writerows(history)
    write_json_atomic(folder / "history.json", {"losses": history, "validation": evals})
    with atomic_write(folder / "losses.png") as tmp:
        plot_history(tmp, history, evals, bits)


def plot_history(path: Path, history: list[dict], evals: list[dict], bits: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3 if evals else 2, figsize=(15 if evals else 10, 4))
    for key in ("inter", "inter_extra", "image", "text", "total"):
        axes[0].plot(epochs, [r[key] for r in history], label=key)
    axes[0].set(title=f"{bits} bits: contrastive terms", xlabel="epoch")
    for key in ("adversarial", "quantization", "balance", "discriminator"):
        axes[1].plot(epochs, [r[key] for r in history], label=key)
    axes[1].set(title="adversarial, quantization, balance", xlabel="epoch", yscale="log")
    if evals:
        for direction in DIRECTIONS:
            axes[2].plot([e["epoch"] for e in evals], [e["map"][direction]["reference"] for e in evals],
                         marker="o", label=direction)
        axes[2].set(title="validation mAP@K (reference definition)", xlabel="epoch")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)


def format_table(results: dict, definition: str = "reference", k: int = 20) -> str:
    """The published tables' layout: one row per direction, one column per code length."""
    bits = sorted(results, key=int)
    lines = [f"{f'mAP@{k} ({definition})':<21}" + "".join(f"{b + ' bits':>10}" for b in map(str, bits))]
    for direction in DIRECTIONS:
        cells = "".join(f"{results[b][direction][definition]:>10.3f}" for b in bits)
        lines.append(f"{direction:<21}{cells}")
    return "\n".join(lines)

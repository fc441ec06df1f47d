"""DUCH train-hash speed: the UCM run per code length, and training throughput at archive scale.

    python bench/train_speed.py --run runs/ucm                  # both parts at full size (a GPU's job)
    python bench/train_speed.py --run runs/ucm --quick          # CPU-sized: 64 bits x 10 epochs, 4096 items
    python bench/train_speed.py --run runs/ucm --recipe paper --items 0   # the paper's 100-epoch UCM run
    python bench/train_speed.py --items 1000000 --label graphs  # throughput only
    python bench/train_speed.py --compile --label compiled      # throughput with torch.compile'd loss terms
    python bench/train_speed.py --no-cuda-graphs ...            # the eager GPU path, for comparison

(i) UCM: `train_hash` with the --recipe's config (default: the defaults) on a finished extract run, in a scratch
run directory that links the extract stage (the run's own train-hash is left alone); seconds per code length as
the stage reports them (weight init, the first binary targets, every epoch and the validation mAPs).
(ii) Synthetic: N items of random D-dim image features with one augmented view each and two captions each, trained
by the stage's own train_bits (no evaluation); after --warmup epochs, each of --repeats epochs is timed and its
item-updates/s (items trained on / seconds of that epoch) taken; the median is reported, with peak memory
(torch.cuda.max_memory_allocated on a GPU, the process's ru_maxrss on CPU). Prints a table, writes JSON to
bench/results/.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import save  # noqa: E402
from duch.data.splits import Split  # noqa: E402
from duch.pipeline.compute.device import resolve_device, resolve_precision  # noqa: E402
from duch.pipeline.config import TRAIN_RECIPES, TrainConfig  # noqa: E402
from duch.pipeline.train.data import TrainData  # noqa: E402
from duch.pipeline.train.graphs import use_graphs  # noqa: E402
from duch.pipeline.train.loop import train_bits  # noqa: E402
from duch.stages.train_hash import train_hash  # noqa: E402


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device: torch.device) -> int:
    """GPU: the most allocated since reset_peak. CPU: the process's high-water mark (it cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def ucm_seconds(run: Path, bits: tuple[int, ...], epochs: int | None, device: torch.device, graphs: bool,
                recipe: str = "duch") -> dict:
    with tempfile.TemporaryDirectory(prefix="duch-speed-") as scratch:
        (Path(scratch) / "extract").symlink_to((run / "extract").resolve())
        cfg = TrainConfig.recipe(recipe, run=scratch, bits=bits, device=device.type, cuda_graphs=graphs,
                                 **({} if epochs is None else {"epochs": epochs}))
        reset_peak(device)
        t0 = time.perf_counter()
        results = train_hash(cfg, progress=False, echo=lambda _: None).manifest["results"]
        return {"recipe": recipe, "epochs": cfg.epochs,
                "seconds_per_bits": {b: r["seconds"] for b, r in results.items()},
                "stage_seconds": time.perf_counter() - t0, "peak_bytes": peak_bytes(device),
                "map_reference": {b: {d: v["reference"] for d, v in r["map"].items()} for b, r in results.items()}}


def synthetic_data(items: int, dim: int, device: torch.device, seed: int = 0) -> TrainData:
    """Unit-length random features; the augmented view and the second caption lie near their first (as real ones
    do), so the contrastive terms have something to learn. Captions of item i: text rows 2i and 2i + 1."""
    gen = torch.Generator(device=device).manual_seed(seed)
    unit = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    noise = lambda *shape: torch.randn(*shape, generator=gen, device=device)  # noqa: E731
    image = unit(noise(items, dim))
    caption = unit(noise(items, dim))
    text = unit(torch.stack([caption, caption + 0.5 * unit(noise(items, dim))], dim=1)).view(2 * items, dim)
    return TrainData(image, unit(image + 0.5 * unit(noise(items, dim)))[:, None], text,
                     torch.arange(2 * items, device=device).view(items, 2),
                     torch.full((items,), 2, dtype=torch.long, device=device))


def synthetic_throughput(items: int, dim: int, bits: int, batch_size: int, warmup: int, repeats: int,
                         device: torch.device, compile_terms: bool, graphs: bool) -> dict:
    reset_peak(device)
    data = synthetic_data(items, dim, device)
    cfg = TrainConfig(run="synthetic", bits=(bits,), epochs=warmup + repeats, batch_size=batch_size,
                      device=device.type, cuda_graphs=graphs, compile_terms=compile_terms)
    cfg.precision = resolve_precision(cfg.precision, device)
    split = Split(np.arange(items), np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    run = train_bits(bits, cfg, data, split, None, np.array([]), progress=False)
    trained = items if items % batch_size != 1 else items - 1  # an epoch skips a last batch of one item
    timed = run.epoch_seconds[warmup:]
    rates = [trained / s for s in timed]
    return {"items": items, "dim": dim, "bits": bits, "batch_size": batch_size, "precision": cfg.precision,
            "compile_terms": compile_terms, "warmup_epochs": warmup, "timed_epochs": len(timed),
            "epoch_seconds": run.epoch_seconds,
            "item_updates_per_s": float(np.median(rates)), "item_updates_per_s_min": min(rates),
            "item_updates_per_s_max": max(rates), "steps_per_s": float(np.median(rates)) / batch_size,
            "peak_bytes": peak_bytes(device), "final_losses": run.history[-1]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="run directory with a finished extract stage (the UCM part; skipped without)")
    parser.add_argument("--bits", default="16,32,64,128", help="UCM code lengths")
    parser.add_argument("--recipe", default="duch", choices=sorted(TRAIN_RECIPES), help="UCM: named settings")
    parser.add_argument("--epochs", type=int, default=None, help="UCM epochs [default: the recipe's]")
    parser.add_argument("--items", type=int, default=1_000_000, help="synthetic items (0 skips the part)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--synthetic-bits", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1, help="synthetic epochs before timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed synthetic epochs")
    parser.add_argument("--compile", action="store_true", help="synthetic: torch.compile the loss terms (GPU)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="the eager GPU path, for comparison")
    parser.add_argument("--quick", action="store_true", help="CPU-sized: UCM 64 bits x 10 epochs, 4096 items")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--label", default="default")
    args = parser.parse_args(argv)
    if args.quick:
        args.bits, args.epochs, args.items = "64", 10, 4096

    device = resolve_device(args.device)
    out = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "torch": torch.__version__,
           "cuda_graphs": use_graphs(device, TrainConfig(run="", cuda_graphs=not args.no_cuda_graphs)),
           "quick": args.quick}
    if args.run:
        out["ucm"] = ucm_seconds(Path(args.run), tuple(int(b) for b in args.bits.split(",")), args.epochs, device,
                                 not args.no_cuda_graphs, args.recipe)
    if args.items:
        out["synthetic"] = synthetic_throughput(args.items, args.dim, args.synthetic_bits, args.batch_size,
                                                args.warmup, args.repeats, device, args.compile,
                                                not args.no_cuda_graphs)
    print_table(out)
    path = save(f"train_speed-{args.label}", out)
    print(f"saved {path}")
    return out


def print_table(out: dict) -> None:
    print(f"\n{out['device']} {out['gpu'] or ''} torch {out['torch']}, CUDA graphs: {out['cuda_graphs']}")
    if "ucm" in out:
        ucm = out["ucm"]
        bits = list(ucm["seconds_per_bits"])
        print(f"UCM {ucm['recipe']}, {ucm['epochs']} epochs" + "".join(f"{b + ' bits':>10}" for b in bits))
        print(f"{'seconds':<16}" + "".join(f"{ucm['seconds_per_bits'][b]:>10.2f}" for b in bits))
        print(f"{'I->T mAP@20':<16}" + "".join(f"{ucm['map_reference'][b]['I->T']:>10.3f}" for b in bits))
        print(f"peak memory {ucm['peak_bytes'] / 2**20:.0f} MiB")
    if "synthetic" in out:
        s = out["synthetic"]
        print(f"synthetic: {s['items']:,} items x {s['dim']}-d, batch {s['batch_size']}, {s['bits']} bits, "
              f"{s['precision']}{', compiled terms' if s['compile_terms'] else ''}: "
              f"{s['item_updates_per_s']:,.0f} item-updates/s (median of {s['timed_epochs']} "
              f"epochs; {s['item_updates_per_s_min']:,.0f}-{s['item_updates_per_s_max']:,.0f}), "
              f"{s['steps_per_s']:,.0f} steps/s, peak memory {s['peak_bytes'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()

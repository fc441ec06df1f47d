"""Stage 1: image and text embeddings (with augmented views) into HDF5 shards and a manifest.

The archive is cut into fixed shards in dataset order: image shard k holds images [k*S, (k+1)*S), text shard k
holds caption rows [k*S, (k+1)*S). Each shard carries the run's fingerprint, so a rerun keeps every finished
shard of the same settings and inputs, redoes only the missing ones, and refuses to mix in shards of others.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from data import Dataset, Item, Reject, read_dataset
from data.augment import augment_caption, augment_image, view_rng
from data.images import ImageLoadError, load_image
from pipeline import DuchError, cluster
from pipeline.config import ExtractConfig, digest, manifest_config
from pipeline.encoders import EncoderSpec, load_encoders, parse_spec
from pipeline.encoders.context import count_truncated
from pipeline.features import damaged_outputs
from pipeline.lock import run_lock, sweep_temporaries
from pipeline.manifest import library_versions, now_iso, read_manifest, sha256_file, write_manifest
from pipeline.rundir import clear_stage, stage_dir
from pipeline.shards import read_attrs, read_shard, shard_name, write_shard
from pipeline.storage import write_errors

STAGE = "extract"


@dataclass(frozen=True)
class TextRow:
    image_id: str
    caption_index: int
    text: str
    augmented: bool  # a rule-based rewrite standing in for a missing second caption


@dataclass
class ShardPlan:
    modality: str  # "image" | "text"
    index: int
    rows: list  # Items for image shards, TextRows for text shards

    @property
    def name(self) -> str:
        return shard_name(self.modality, self.index)


@dataclass
class ExtractResult:
    stage_dir: Path
    manifest: dict
    did_work: bool


def text_rows(dataset: Dataset, cfg: ExtractConfig) -> list[TextRow]:
    rows = []
    for item in dataset.items:
        for k, caption in enumerate(item.captions):
            rows.append(TextRow(item.id, k, caption, False))
        if len(item.captions) == 1:
            rewrite = augment_caption(item.captions[0], view_rng(cfg.seed, item.id, 1), cfg.text_augment)
            rows.append(TextRow(item.id, 1, rewrite, True))
    return rows


def plan_shards(dataset: Dataset, cfg: ExtractConfig, with_text: bool) -> list[ShardPlan]:
    size = cfg.shard_size
    plans = [ShardPlan("image", k, dataset.items[s:s + size]) for k, s in enumerate(range(0, len(dataset.items), size))]
    if with_text:
        rows = text_rows(dataset, cfg)
        plans += [ShardPlan("text", k, rows[s:s + size]) for k, s in enumerate(range(0, len(rows), size))]
    return plans


def _file_rows(root: str, names: list[str], describe: Callable[[str], tuple], missing: tuple) -> list[tuple]:
    """(name, *describe(path)) per file, (name, *missing) for one that cannot be read."""
    rows = []
    for name in names:
        try:
            rows.append((name, *describe(os.path.join(root, name))))
        except OSError:
            rows.append((name, *missing))
    return rows


def _size_and_mtime(path: str) -> tuple:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def _image_rows(dataset: Dataset, describe: Callable[[str], tuple], missing: tuple, chunk: int,
                bar: tqdm | None = None) -> list[tuple]:
    """_file_rows of every image, in dataset order, `chunk` files to a task on 8 threads: on a shared filesystem
    (NFS, Lustre) every stat or read is a round trip, and a cluster's archive is there."""
    names = [item.image for item in dataset.items]
    chunks = [names[s:s + chunk] for s in range(0, len(names), chunk)]
    describe_chunk = functools.partial(_file_rows, os.fspath(dataset.images_dir), describe=describe, missing=missing)
    rows = []
    with ThreadPoolExecutor(max_workers=min(8, len(chunks)) or 1) as pool:
        for part in pool.map(describe_chunk, chunks):
            rows += part
            if bar is not None:
                bar.update(len(part))
    return rows


def input_fingerprint(dataset: Dataset) -> dict:
    """Annotation by content; images by (path, size, mtime): cheap for millions of files, and it sees edits."""
    listing = _image_rows(dataset, _size_and_mtime, (None, None), chunk=4096)
    source = dataset.source if dataset.source.is_file() else None
    return {
        "kind": dataset.kind,
        "annotation_sha256": sha256_file(source) if source else None,
        "items": len(dataset.items),
        "captions": dataset.n_captions,
        "images_listing_sha256": digest(listing),
    }


def images_content_digest(dataset: Dataset, progress: bool = False) -> str:
    """One digest of every image's path and bytes, in dataset order. Not in the fingerprint (that would mean
    reading the whole archive at every rerun): kept beside it, to tell a copied or restored archive (new
    modification times, the same bytes) from a changed one when the quick listing differs."""
    with tqdm(total=len(dataset.items), unit="img", desc="hashing images", disable=not progress,
              dynamic_ncols=True) as bar:  # on threads: hashlib frees the GIL on large blocks
        return digest(_image_rows(dataset, lambda path: (sha256_file(path),), (None,), chunk=256, bar=bar))


def _without_listing(basis: dict) -> dict:
    return {**basis, "inputs": {**basis.get("inputs", {}), "images_listing_sha256": None}}


def relisted_with_same_content(out_dir: Path, previous: dict, basis: dict, dataset: Dataset,
                               echo: Callable[[str], None], progress: bool = False) -> dict | None:
    """The finished stage's manifest if it still holds this archive although the images' quick listing (path,
    size, mtime) changed and nothing else did: their bytes hash as they did at extraction (a copy, a restore from
    backup, a `touch`); else None. The listing is then recorded as confirmed, so the next rerun finds it at once,
    and the stage keeps its fingerprint: the later stages stay up to date too."""
    listing = basis["inputs"]["images_listing_sha256"]
    if "basis" not in previous or _without_listing(previous["basis"]) != _without_listing(basis):
        return None
    if listing in previous.get("confirmed_listings", []):
        return previous
    if not previous.get("images_content_sha256"):
        return None
    echo(f"extract: the images' sizes or modification times changed since extraction; comparing the contents of "
         f"{len(dataset.items)} images with what was extracted")
    if images_content_digest(dataset, progress) != previous["images_content_sha256"]:
        return None
    echo("extract: the images' contents are unchanged; the extracted embeddings still hold")
    confirmed = {**previous, "confirmed_listings": [*previous.get("confirmed_listings", []), listing]}
    with write_errors(out_dir):
        write_manifest(out_dir, confirmed)
    return confirmed


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DuchError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
    return torch.device(device)


# ---------------------------------------------------------------------------------------------- image views
class ImageViews(torch.utils.data.Dataset):
    """Item i -> (i, [1+V, 3, H, W] pixels, None), or (i, None, reason) for an image that cannot be used."""

    def __init__(self, items: list[Item], images_dir: Path, transform, cfg: ExtractConfig):
        self.items = items
        self.images_dir = images_dir
        self.transform = transform
        self.views = cfg.image_views
        self.seed = cfg.seed
        self.augment = cfg.image_augment

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            img = load_image(self.images_dir / item.image)
            views = [self.transform(img)]
            views += [self.transform(augment_image(img, view_rng(self.seed, item.id, v), self.augment))
                      for v in range(1, self.views + 1)]
            return i, torch.stack(views), None
        except ImageLoadError as e:
            return i, None, str(e)
        except Exception as e:  # a decoder or transform failing on one odd file must not stop the run
            return i, None, f"cannot process image: {type(e).__name__}: {e}"


def collate_views(batch):
    ok = [(i, px) for i, px, _ in batch if px is not None]
    bad = [(i, reason) for i, _, reason in batch if reason is not None]
    pixels = torch.stack([px for _, px in ok]) if ok else None
    return [i for i, _ in ok], pixels, bad


def _image_batches(plans: list[ShardPlan], batch_size: int) -> tuple[list[Item], list[list[int]], list[ShardPlan]]:
    items = [item for plan in plans for item in plan.rows]
    batches, owners, offset = [], [], 0
    for plan in plans:  # batches never straddle shards, so each shard is written as soon as it is complete
        n = len(plan.rows)
        for s in range(0, n, batch_size):
            batches.append(list(range(offset + s, offset + min(n, s + batch_size))))
            owners.append(plan)
        offset += n
    return items, batches, owners


# The batched path also runs on a CPU device (decoding with libjpeg-turbo through torchvision). It is not
# offered there: batching pays off on a GPU, while on a CPU PIL in worker processes is no slower. Tests switch
# it on to check the batched code against the PIL path on machines without a GPU.
BATCHED_ON_CPU = False


def jpeg_share(items: list[Item]) -> float:
    return sum(1 for item in items if Path(item.image).suffix.lower() in (".jpg", ".jpeg")) / max(1, len(items))


def choose_decode(cfg: ExtractConfig, jpegs: float, encoder, device: torch.device):
    """("gpu", TensorPreprocess) for the batched path, or ("cpu", why the PIL path runs)."""
    from pipeline.gpu_decode import TensorPreprocess, nvjpeg_problem

    if cfg.decode == "cpu":
        return "cpu", "--decode cpu"
    problems = _decode_problems(cfg, device)
    prep = TensorPreprocess.from_transform(encoder.transform)
    if prep is None:
        problems.append(f"{encoder.spec}'s preprocessing has steps only the PIL path runs")
    if device.type == "cuda" and not problems:
        problem = nvjpeg_problem(device)
        if problem:
            problems.append(f"nvJPEG is not usable ({problem})")
    if cfg.decode == "auto" and not problems:
        if jpegs < 0.5:  # the rest would go to PIL on threads, slower than worker processes
            problems.append("most images are not JPEG")
    if problems:
        if cfg.decode == "gpu":
            raise DuchError(f"--decode gpu: {'; '.join(problems)}; use --decode auto or cpu")
        return "cpu", "; ".join(problems)
    return "gpu", prep


def _decode_problems(cfg: ExtractConfig, device: torch.device) -> list[str]:
    """What rules the batched path out before any encoder is loaded."""
    problems = []
    if device.type != "cuda" and not BATCHED_ON_CPU:
        problems.append("the device is not a CUDA GPU")
    if cfg.image_views:
        problems.append("augmented views (--image-views > 0) are made with PIL")
    return problems


def _extract_images(plans: list[ShardPlan], images_dir: Path, encoder, cfg: ExtractConfig, fingerprint: str,
                    out_dir: Path, dtype: np.dtype, bar: tqdm, writes: list, writer: ThreadPoolExecutor,
                    decode: tuple) -> dict:
    items, batches, owners = _image_batches(plans, cfg.batch_size)
    views = ImageViews(items, images_dir, encoder.transform, cfg)
    if decode[0] == "gpu":
        from stages.extract_fast import BatchedImages

        source = BatchedImages(items, images_dir, batches, decode[1], encoder.device, views.__getitem__)
    else:
        workers = cfg.resolved_workers()
        source = DataLoader(views, batch_sampler=batches, num_workers=workers, collate_fn=collate_views,
                            pin_memory=encoder.device.type == "cuda", prefetch_factor=4 if workers else None)
    buffer: dict | None = None
    for (indices, pixels, bad), plan in zip(source, owners):
        if buffer is None or buffer["plan"] is not plan:
            buffer = {"plan": plan, "seen": 0, "ok": [], "emb": [], "rejects": []}
        if pixels is not None:
            n, v = pixels.shape[:2]
            emb = encoder.encode(pixels.flatten(0, 1)).reshape(n, v, -1)
            buffer["emb"].append(emb.numpy().astype(dtype))
            buffer["ok"].extend(indices)
        buffer["rejects"].extend(Reject(items[i].id, reason) for i, reason in bad)
        buffer["seen"] += len(indices) + len(bad)
        bar.update(len(indices) + len(bad))
        if buffer["seen"] == len(plan.rows):  # written on a thread while the next shard is encoded
            writes.append(writer.submit(_write_image_shard, plan, items, buffer, encoder, cfg, fingerprint,
                                        out_dir, dtype))
    if decode[0] == "gpu":
        return {"path": "gpu", "batched": source.stats["batched"], "pil": source.stats["pil"]}
    return {"path": "cpu", "why": decode[1]}


def _write_image_shard(plan, items, buffer, encoder, cfg, fingerprint, out_dir, dtype) -> None:
    ok_items = [items[i] for i in buffer["ok"]]
    emb = np.concatenate(buffer["emb"]) if buffer["emb"] else np.zeros((0, 1 + cfg.image_views, encoder.dim), dtype)
    arrays = {
        "ids": [it.id for it in ok_items],
        "path": [it.image for it in ok_items],
        "label": [it.label or "" for it in ok_items],
        "split": [it.split or "" for it in ok_items],
        "emb": emb[:, 0],
    }
    if cfg.image_views:
        arrays["views"] = emb[:, 1:]
    arrays.update(_reject_arrays(buffer["rejects"]))
    write_shard(out_dir / plan.name, arrays, _shard_attrs(plan, encoder, fingerprint, len(ok_items)))


def _reject_arrays(rejects: list[Reject]) -> dict:
    return {"reject_id": [r.id for r in rejects], "reject_reason": [r.reason for r in rejects]}


def _shard_attrs(plan: ShardPlan, encoder, fingerprint: str, rows: int) -> dict:
    return {"modality": plan.modality, "shard": plan.index, "fingerprint": fingerprint, "encoder": encoder.spec,
            "dim": encoder.dim, "rows": rows}


class TokenBatches(torch.utils.data.Dataset):
    """Batch k -> its captions tokenised (or as they are, for an encoder that tokenises inside encode)."""

    def __init__(self, batches: list[list[str]], tokenizer):
        self.batches = batches
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int):
        texts = self.batches[k]
        return self.tokenizer(texts) if self.tokenizer is not None else texts


def _extract_texts(plans: list[ShardPlan], encoder, cfg: ExtractConfig, fingerprint: str, out_dir: Path,
                   dtype: np.dtype, bar: tqdm, writes: list, writer: ThreadPoolExecutor) -> None:
    batches, owners = [], []
    for plan in plans:
        for s in range(0, len(plan.rows), cfg.text_batch_size):
            batches.append([r.text for r in plan.rows[s:s + cfg.text_batch_size]])
            owners.append(plan)
    tokenizer = getattr(encoder, "tokenizer", None)
    # Tokenising in worker processes keeps the next batches ready while the model encodes this one.
    workers = cfg.resolved_workers() if tokenizer is not None else 0
    loader = DataLoader(TokenBatches(batches, tokenizer), batch_size=None, num_workers=workers,
                        pin_memory=tokenizer is not None and encoder.device.type == "cuda",
                        prefetch_factor=4 if workers else None)
    chunks: list = []
    for k, (batch, plan) in enumerate(zip(loader, owners)):
        emb = encoder.encode_tokens(batch) if tokenizer is not None else encoder.encode(batch)
        chunks.append(emb.numpy().astype(dtype))
        bar.update(len(batches[k]))
        if k + 1 == len(owners) or owners[k + 1] is not plan:
            writes.append(writer.submit(_write_text_shard, plan, np.concatenate(chunks), encoder, fingerprint,
                                        out_dir))
            chunks = []


def _write_text_shard(plan: ShardPlan, emb: np.ndarray, encoder, fingerprint: str, out_dir: Path) -> None:
    arrays = {
        "image_id": [r.image_id for r in plan.rows],
        "caption_index": np.array([r.caption_index for r in plan.rows], dtype=np.int32),
        "augmented": np.array([r.augmented for r in plan.rows], dtype=bool),
        "text": [r.text for r in plan.rows],
        "emb": emb,
    }
    arrays.update(_reject_arrays([]))
    write_shard(out_dir / plan.name, arrays, _shard_attrs(plan, encoder, fingerprint, len(plan.rows)))


# ---------------------------------------------------------------------------------------------- the stage
def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return keys


def _stale_error(out_dir: Path, previous: dict | None, new: dict) -> DuchError:
    detail, old = "", (previous or {}).get("basis")
    if old:
        changes = _changed_keys(old, new)
        detail = f" (changed: {'; '.join(changes[:4])}{' ...' if len(changes) > 4 else ''})" if changes else ""
        if _without_listing(old) == _without_listing(new) and not previous.get("images_content_sha256"):
            detail += (" (made before extract kept a digest of the images' bytes, so an archive copied with new "
                       "modification times cannot be told from an edited one)")
    return DuchError(f"{out_dir} holds embeddings made from other settings or inputs{detail}; "
                     "rerun with --force to redo it, or choose another --run directory")


def extract(cfg: ExtractConfig, force: bool = False, progress: bool = True,
            echo: Callable[[str], None] = print) -> ExtractResult:
    """Run stage 1 (or resume it, or find it up to date) and return its manifest."""
    cfg.validate()
    with run_lock(cfg.run, STAGE):
        return _extract(cfg, force, progress, echo)


def _extract(cfg: ExtractConfig, force: bool, progress: bool, echo: Callable[[str], None]) -> ExtractResult:
    if cfg.decode == "gpu":  # said before the run directory is touched and the encoders are loaded
        problems = _decode_problems(cfg, resolve_device(cfg.device))
        if problems:
            raise DuchError(f"--decode gpu: {'; '.join(problems)}; use --decode auto or cpu")
    t_start = time.perf_counter()
    scheduler = cluster.SchedulerSpec.parse(cfg.scheduler)
    image_spec = parse_spec(cfg.image_encoder, "image")
    text_spec = parse_spec(cfg.text_encoder, "text") if cfg.text_encoder else None
    dataset = read_dataset(cfg.data, cfg.images)
    if not dataset.items:
        raise DuchError(f"{dataset.source}: the dataset holds no images")
    out_dir = stage_dir(cfg.run, STAGE)
    basis = {"settings": {**cfg.output_settings(), "image_encoder": image_spec.fingerprint(),
                          "text_encoder": text_spec.fingerprint() if text_spec else None},
             "inputs": input_fingerprint(dataset)}
    basis = json.loads(json.dumps(basis, default=str))  # the form it takes in the manifest, tuples as lists
    fingerprint = digest(basis)

    previous = read_manifest(out_dir)
    if previous and not force:
        if previous.get("fingerprint") != fingerprint:
            confirmed = relisted_with_same_content(out_dir, previous, basis, dataset, echo, progress)
            if confirmed is None:
                raise _stale_error(out_dir, previous, basis)
            previous, fingerprint, basis = confirmed, confirmed["fingerprint"], confirmed["basis"]
        damaged = damaged_outputs(out_dir, previous)
        for path in damaged:
            echo(f"extract: {path} is missing or does not match its checksum; writing it again")
        if not damaged:
            c = previous["counts"]
            echo(f"extract: up to date ({c['images']} images, {c['captions']} captions, {c['rejects']} rejects) "
                 f"in {out_dir}; nothing to do (--force redoes it)")
            return ExtractResult(out_dir, previous, did_work=False)
    if force:
        clear_stage(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)  # work starts: the stage is not finished any more

    plans = plan_shards(dataset, cfg, with_text=text_spec is not None and dataset.has_captions)
    pending = _pending_shards(plans, out_dir, fingerprint, basis)
    n_done = len(plans) - len(pending)
    if n_done:
        echo(f"extract: resuming, {n_done} of {len(plans)} shards already finished")

    pending_images = [p for p in pending if p.modality == "image"]
    pending_texts = [p for p in pending if p.modality == "text"]
    specs = (image_spec if pending_images else None, text_spec if pending_texts else None)
    if scheduler.kind == "none" or not pending:
        device = resolve_device(cfg.device)
        with cluster.torch_threads(cfg.threads):
            timings, image_decode = _encode_here(pending_images, pending_texts, specs, dataset, cfg, fingerprint,
                                                 out_dir, device, progress)
        execution = {"scheduler": "none"}
    else:
        jobs = [ShardJob(cfg, plan, str(dataset.images_dir), str(out_dir), fingerprint, specs,
                         jpeg_share(dataset.items)) for plan in pending]
        with cluster.connect(scheduler, cfg.device, echo, cfg.threads) as client:
            timings, image_decode, device, execution = _encode_on_cluster(client, jobs, progress)
        execution["scheduler"] = str(scheduler)
        # A worker killed mid-shard leaves its temporary behind; its shard was redone elsewhere and every task is
        # finished, so no writer is left (and the run lock is still held).
        sweep_temporaries(out_dir)

    manifest = _finish(out_dir, plans, dataset, cfg, basis, fingerprint, device, timings, t_start, image_decode,
                       execution, text_spec, progress)
    c = manifest["counts"]
    rate = ", ".join(f"{timings[k]:.1f} {u}/s" for k, u in (("images_per_s", "images"), ("captions_per_s", "captions"))
                     if k in timings)
    echo(f"extract: {c['images']} images (+{c['image_views']} views each), {c['captions']} captions, "
         f"{c['rejects']} rejects in {manifest['timings']['total_s']:.1f} s ({rate or 'nothing to encode'}) -> {out_dir}")
    if c["rejects"]:
        echo(f"extract: warning: {c['rejects']} items skipped; see 'rejects' in {out_dir / 'manifest.json'}")
    if c["truncated_captions"]:
        echo(f"extract: note: {c['truncated_captions']} of {c['captions']} captions are longer than the text encoder "
             "reads; each is embedded from its first tokens only")
    return ExtractResult(out_dir, manifest, did_work=True)


def _encode_here(pending_images, pending_texts, specs, dataset, cfg, fingerprint, out_dir, device,
                 progress) -> tuple[dict, dict | None]:
    """In this process: one DataLoader over every pending image shard (so loading never pauses between
    shards), then the captions; shards are written on a thread while the next ones are encoded."""
    dtype = np.dtype(cfg.dtype)
    timings = {}
    t0 = time.perf_counter()
    image_encoder, text_encoder = load_encoders(*specs, str(device))
    timings["load_encoders_s"] = time.perf_counter() - t0
    n_images = sum(len(p.rows) for p in pending_images)
    n_texts = sum(len(p.rows) for p in pending_texts)
    image_decode = None
    with ThreadPoolExecutor(1, thread_name_prefix="duch-write") as writer:  # h5py serialises its own calls
        writes: list = []
        if pending_images:
            decode = choose_decode(cfg, jpeg_share(dataset.items), image_encoder, device)
            t0 = time.perf_counter()
            with tqdm(total=n_images, unit="img", desc="images", disable=not progress, dynamic_ncols=True) as bar:
                image_decode = _extract_images(pending_images, dataset.images_dir, image_encoder, cfg, fingerprint,
                                               out_dir, dtype, bar, writes, writer, decode)
                _wait(writes)
            timings["images_s"] = time.perf_counter() - t0
            timings["images_per_s"] = n_images / timings["images_s"]
        if pending_texts:
            t0 = time.perf_counter()
            with tqdm(total=n_texts, unit="cap", desc="captions", disable=not progress, dynamic_ncols=True) as bar:
                _extract_texts(pending_texts, text_encoder, cfg, fingerprint, out_dir, dtype, bar, writes, writer)
                _wait(writes)
            timings["captions_s"] = time.perf_counter() - t0
            timings["captions_per_s"] = n_texts / timings["captions_s"]
    return timings, image_decode


@dataclass(frozen=True)
class ShardJob:
    """What a dask worker needs to make one shard: settings, rows and paths only, no open file or model."""

    cfg: ExtractConfig
    plan: ShardPlan
    images_dir: str
    out_dir: str
    fingerprint: str
    specs: tuple  # (image EncoderSpec | None, text EncoderSpec | None): loaded together, once per worker
    jpeg_share: float  # of the whole archive, so every worker picks the decoding path the driver would


def extract_shard(job: ShardJob) -> dict:
    """One shard, start to finish, on a dask worker (or anywhere): the task `--scheduler` maps over shards."""
    cluster.require_shared({"the images folder": job.images_dir, "the stage folder": job.out_dir})
    cluster.setup_worker(job.cfg.threads)
    device = resolve_device(cluster.worker_device(job.cfg.device))
    image_encoder, text_encoder = cluster.cached("extract-encoders", (job.specs, str(device)),
                                                 lambda: load_encoders(*job.specs, str(device)))
    # Within a dask worker (a daemonic process) images load in the task's own process, the cluster's
    # workers being the parallelism.
    cfg = job.cfg if cluster.can_fork_workers() else dataclasses.replace(job.cfg, workers=0)
    dtype = np.dtype(cfg.dtype)
    out_dir = Path(job.out_dir)
    decode = None
    with ThreadPoolExecutor(1) as writer, tqdm(disable=True) as bar:
        writes: list = []
        if job.plan.modality == "image":
            decode = _extract_images([job.plan], Path(job.images_dir), image_encoder, cfg, job.fingerprint, out_dir,
                                     dtype, bar, writes, writer,
                                     choose_decode(cfg, job.jpeg_share, image_encoder, device))
        else:
            _extract_texts([job.plan], text_encoder, cfg, job.fingerprint, out_dir, dtype, bar, writes, writer)
        _wait(writes)
    return {"modality": job.plan.modality, "rows": len(job.plan.rows), "device": str(device), "decode": decode,
            "worker": getattr(cluster.in_worker(), "address", None)}


def _encode_on_cluster(client, jobs: list[ShardJob], progress: bool) -> tuple[dict, dict | None, str, dict]:
    total = sum(len(job.plan.rows) for job in jobs)
    t0 = time.perf_counter()
    finished: dict[str, float] = {}
    results: list[dict] = []

    def done(job: ShardJob, result: dict) -> None:
        results.append(result)
        finished[job.plan.modality] = time.perf_counter() - t0
        bar.update(len(job.plan.rows))

    with tqdm(total=total, unit="item", desc=f"{len(jobs)} shards", disable=not progress, dynamic_ncols=True) as bar:
        cluster.run_jobs(client, extract_shard, jobs, [job.plan.name for job in jobs], done,
                         cluster.gpu_resources(client))
    timings = {}
    for modality, unit in (("image", "images"), ("text", "captions")):
        n = sum(len(job.plan.rows) for job in jobs if job.plan.modality == modality)
        if n:  # the modalities overlap on the cluster: each is timed from the start to its last shard
            timings[f"{unit}_s"] = finished[modality]
            timings[f"{unit}_per_s"] = n / finished[modality]
    devices = sorted({r["device"] for r in results})
    execution = {"workers": len({r["worker"] for r in results}), "tasks": len(results)}
    return timings, _merge_decode([r["decode"] for r in results if r["decode"]]), ",".join(devices), execution


def _merge_decode(infos: list[dict]) -> dict | None:
    """The shards' decoding paths as one entry, the form an in-process run records."""
    if not infos:
        return None
    if all(i["path"] == "cpu" for i in infos) and len({i["why"] for i in infos}) == 1:
        return infos[0]
    gpu = [i for i in infos if i["path"] == "gpu"]
    if len(gpu) == len(infos):
        return {"path": "gpu", "batched": sum(i["batched"] for i in gpu), "pil": sum(i["pil"] for i in gpu)}
    return {"path": "mixed", "shards": infos}


def _pending_shards(plans: list[ShardPlan], out_dir: Path, fingerprint: str, basis: dict) -> list[ShardPlan]:
    pending = []
    for plan in plans:
        path = out_dir / plan.name
        if not path.exists():
            pending.append(plan)
            continue
        try:
            attrs = read_attrs(path)
        except OSError:  # unreadable: treat as not done
            path.unlink()
            pending.append(plan)
            continue
        if attrs.get("fingerprint") != fingerprint:
            raise _stale_error(out_dir, None, basis)
    return pending


def _wait(writes: list) -> None:
    for future in writes:
        future.result()  # a failed write raises here
    writes.clear()


def _finish(out_dir, plans, dataset, cfg, basis, fingerprint, device, timings, t_start, image_decode,
            execution, text_spec: EncoderSpec | None, progress: bool = False) -> dict:
    outputs, rejects = [], list(dataset.rejects)
    rows = {"image": 0, "text": 0}
    dims = {}
    for plan in plans:
        path = out_dir / plan.name
        attrs = read_attrs(path)
        rows[plan.modality] += int(attrs["rows"])
        dims[plan.modality] = {"encoder": attrs["encoder"], "dim": int(attrs["dim"])}
        shard_rejects = read_shard(path, ("reject_id", "reject_reason"))
        rejects += [Reject(i, r) for i, r in zip(shard_rejects["reject_id"], shard_rejects["reject_reason"])]
        outputs.append({"file": plan.name, "modality": plan.modality, "rows": int(attrs["rows"]),
                        "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    n_aug = sum(1 for p in plans if p.modality == "text" for r in p.rows if r.augmented)
    # Counted from the plans (every caption row of the archive, not only this session's), with the tokenizer
    # alone: the same number whether the shards were written here, on a cluster, or by an earlier attempt.
    real_captions = [r.text for p in plans if p.modality == "text" for r in p.rows if not r.augmented]
    n_truncated = count_truncated(text_spec, real_captions) if text_spec and real_captions else 0
    timings["total_s"] = time.perf_counter() - t_start
    manifest = {
        "stage": STAGE,
        "created": now_iso(),
        "fingerprint": fingerprint,
        "basis": basis,
        "config": manifest_config(cfg),
        "device": str(device),
        "versions": library_versions(),
        "dataset": {"kind": dataset.kind, "source": str(Path(dataset.source).resolve()),
                    "images_dir": str(Path(dataset.images_dir).resolve())},
        "encoders": dims,
        # How this session's images were decoded (None: none were pending): gpu with how many files went
        # the batched way and how many to PIL, or cpu and why.
        "image_decode": image_decode,
        "counts": {"items": len(dataset.items), "images": rows["image"], "image_views": cfg.image_views,
                   "captions": rows["text"] - n_aug, "augmented_captions": n_aug, "rejects": len(rejects),
                   # captions longer than the text encoder reads: it sees only their first tokens
                   "truncated_captions": n_truncated},
        "outputs": outputs,
        "images_content_sha256": images_content_digest(dataset, progress),
        "rejects": [{"id": r.id, "reason": r.reason} for r in rejects],
        "timings": {k: round(v, 3) for k, v in timings.items()},
        # Where the work ran; like the timings, it never changes a shard.
        "execution": execution,
    }
    write_manifest(out_dir, manifest)
    return manifest

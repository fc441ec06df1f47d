"""Stage one's work on planned shards: batches through the encoders, each finished shard written (on a thread,
while the next batches are encoded) with its rows, embeddings, rejects and the run's fingerprint."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from duch.data import Reject
from duch.data.scenes import place_columns
from duch.pipeline.config import ExtractConfig
from duch.pipeline.embed.plan import ShardPlan
from duch.pipeline.embed.sources import ImageViews, Skipped, TokenBatches, collate_views, image_batches
from duch.pipeline.formats.shards import write_shard


class ShardWriter:
    """Shards written on one thread while the encoders go on (h5py serialises its own calls anyway); `wait()`
    raises a failed write's error."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="duch-write")
        self.pending: list = []

    def submit(self, fn, *args) -> None:
        self.pending.append(self.pool.submit(fn, *args))

    def wait(self) -> None:
        for future in self.pending:
            future.result()
        self.pending.clear()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True)


def embed_images(plans: list[ShardPlan], images_dir: Path, encoder, cfg: ExtractConfig, fingerprint: str,
                 out_dir: Path, decode: tuple, writer: ShardWriter, bar: tqdm) -> dict:
    """Every image of `plans` (and its augmented views) embedded, shard by shard; `decode` is the path
    sources.choose_decode chose. Returns how the images were decoded, as the manifest records it."""
    items, batches, owners = image_batches(plans, cfg.batch_size)
    views = ImageViews(items, images_dir, encoder.transform, cfg)
    if decode[0] == "gpu":
        from duch.pipeline.encoders.batched import BatchedImages

        source = BatchedImages(items, images_dir, batches, decode[1], encoder.device, views.__getitem__)
    else:
        workers = cfg.resolved_workers()
        source = DataLoader(views, batch_sampler=batches, num_workers=workers, collate_fn=collate_views,
                            pin_memory=encoder.device.type == "cuda", prefetch_factor=4 if workers else None)
    dtype = np.dtype(cfg.dtype)
    buffer: dict | None = None
    for (indices, pixels, bad), plan in zip(source, owners):
        if buffer is None or buffer["plan"] is not plan:
            buffer = {"plan": plan, "seen": 0, "ok": [], "emb": [], "rejects": [], "skipped": []}
        if pixels is not None:
            n, v = pixels.shape[:2]
            emb = encoder.encode(pixels.flatten(0, 1)).reshape(n, v, -1)
            buffer["emb"].append(emb.numpy().astype(dtype))
            buffer["ok"].extend(indices)
        buffer["rejects"].extend(Reject(items[i].id, reason) for i, reason in bad if not isinstance(reason, Skipped))
        buffer["skipped"].extend(items[i].id for i, reason in bad if isinstance(reason, Skipped))
        buffer["seen"] += len(indices) + len(bad)
        bar.update(len(indices) + len(bad))
        if buffer["seen"] == len(plan.rows):
            writer.submit(_write_image_shard, plan, items, buffer, encoder, cfg, fingerprint, out_dir)
    if decode[0] == "gpu":
        return {"path": "gpu", "batched": source.stats["batched"], "pil": source.stats["pil"]}
    return {"path": "cpu", "why": decode[1]}


def _write_image_shard(plan, items, buffer, encoder, cfg: ExtractConfig, fingerprint: str, out_dir: Path) -> None:
    ok_items = [items[i] for i in buffer["ok"]]
    emb = np.concatenate(buffer["emb"]) if buffer["emb"] else np.zeros((0, 1 + cfg.image_views, encoder.dim),
                                                                      np.dtype(cfg.dtype))
    arrays = {
        "ids": [it.id for it in ok_items],
        "path": [it.image for it in ok_items],
        "label": [it.label or "" for it in ok_items],
        "split": [it.split or "" for it in ok_items],
        "emb": emb[:, 0],
    }
    if cfg.image_views:
        arrays["views"] = emb[:, 1:]
    if cfg.tile:  # scene tiles: where each is, and which were skipped for too few valid pixels
        arrays.update(place_columns([it.tile for it in ok_items]))
        arrays["skipped_id"] = buffer["skipped"]
    arrays.update(_reject_arrays(buffer["rejects"]))
    write_shard(out_dir / plan.name, arrays, _shard_attrs(plan, encoder, fingerprint, len(ok_items)))


def embed_texts(plans: list[ShardPlan], encoder, cfg: ExtractConfig, fingerprint: str, out_dir: Path,
                writer: ShardWriter, bar: tqdm) -> None:
    """Every caption row of `plans` embedded, shard by shard; tokenised in worker processes ahead of the model."""
    batches, owners = [], []
    for plan in plans:
        for s in range(0, len(plan.rows), cfg.text_batch_size):
            batches.append([r.text for r in plan.rows[s:s + cfg.text_batch_size]])
            owners.append(plan)
    tokenizer = getattr(encoder, "tokenizer", None)
    workers = cfg.resolved_workers() if tokenizer is not None else 0
    loader = DataLoader(TokenBatches(batches, tokenizer), batch_size=None, num_workers=workers,
                        pin_memory=tokenizer is not None and encoder.device.type == "cuda",
                        prefetch_factor=4 if workers else None)
    dtype = np.dtype(cfg.dtype)
    chunks: list = []
    for k, (batch, plan) in enumerate(zip(loader, owners)):
        emb = encoder.encode_tokens(batch) if tokenizer is not None else encoder.encode(batch)
        chunks.append(emb.numpy().astype(dtype))
        bar.update(len(batches[k]))
        if k + 1 == len(owners) or owners[k + 1] is not plan:
            writer.submit(_write_text_shard, plan, np.concatenate(chunks), encoder, fingerprint, out_dir)
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


def _reject_arrays(rejects: list[Reject]) -> dict:
    return {"reject_id": [r.id for r in rejects], "reject_reason": [r.reason for r in rejects]}


def _shard_attrs(plan: ShardPlan, encoder, fingerprint: str, rows: int) -> dict:
    attrs = {"modality": plan.modality, "shard": plan.index, "fingerprint": fingerprint, "encoder": encoder.spec,
             "dim": encoder.dim, "rows": rows}
    runtime = getattr(encoder, "runtime", "torch")
    return attrs if runtime == "torch" else {**attrs, "runtime": runtime}  # a torch shard as before runtimes

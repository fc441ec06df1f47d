"""Where stage one's shards are made: all in this process (one image loader across the pending shards, then the
captions), or one task per shard on a dask cluster (compute/cluster.py). Either way each shard is the same file,
and the image shards come first: the caption shards are planned from what they rejected (plan.text_plans)."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from duch.data import Dataset
from duch.pipeline.compute import cluster
from duch.pipeline.compute.device import resolve_device
from duch.pipeline.config import ExtractConfig
from duch.pipeline.embed.plan import ShardPlan
from duch.pipeline.embed.shards import ShardWriter, embed_images, embed_texts
from duch.pipeline.embed.sources import choose_decode, jpeg_share
from duch.pipeline.encoders import load_encoders


def encode_here(images: list[ShardPlan], texts: Callable[[], list[ShardPlan]], specs: tuple, dataset: Dataset,
                cfg: ExtractConfig, fingerprint: str, out_dir: Path, device: torch.device,
                progress: bool) -> tuple[dict, dict | None]:
    """(timings, how the images were decoded) of the shards made in this process: one DataLoader over every
    pending image shard (so loading never pauses between shards), then the caption shards `texts()` plans from
    what the image shards rejected."""
    timings = {}
    t0 = time.perf_counter()
    image_encoder, text_encoder = load_encoders(*specs, str(device))
    timings["load_encoders_s"] = time.perf_counter() - t0
    image_decode = None
    with ShardWriter() as writer:
        if images:
            decode = choose_decode(cfg, jpeg_share(dataset.items), image_encoder, device)
            n, t0 = sum(len(p.rows) for p in images), time.perf_counter()
            with tqdm(total=n, unit="img", desc="images", disable=not progress, dynamic_ncols=True) as bar:
                image_decode = embed_images(images, dataset.images_dir, image_encoder, cfg, fingerprint, out_dir,
                                            decode, writer, bar)
                writer.wait()
            timings["images_s"] = time.perf_counter() - t0
            timings["images_per_s"] = n / timings["images_s"]
        pending_texts = texts()
        if pending_texts:
            n, t0 = sum(len(p.rows) for p in pending_texts), time.perf_counter()
            with tqdm(total=n, unit="cap", desc="captions", disable=not progress, dynamic_ncols=True) as bar:
                embed_texts(pending_texts, text_encoder, cfg, fingerprint, out_dir, writer, bar)
                writer.wait()
            timings["captions_s"] = time.perf_counter() - t0
            timings["captions_per_s"] = n / timings["captions_s"]
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
    out_dir = Path(job.out_dir)
    decode = None
    with ShardWriter() as writer, tqdm(disable=True) as bar:
        if job.plan.modality == "image":
            decode = embed_images([job.plan], Path(job.images_dir), image_encoder, cfg, job.fingerprint, out_dir,
                                  choose_decode(cfg, job.jpeg_share, image_encoder, device), writer, bar)
        else:
            embed_texts([job.plan], text_encoder, cfg, job.fingerprint, out_dir, writer, bar)
        writer.wait()
    return {"modality": job.plan.modality, "rows": len(job.plan.rows), "device": str(device), "decode": decode,
            "worker": getattr(cluster.in_worker(), "address", None)}


def encode_on_cluster(client, image_jobs: list[ShardJob], text_jobs: Callable[[], list[ShardJob]],
                      progress: bool) -> tuple[dict, dict | None, str, dict]:
    """(timings, how the images were decoded, devices, execution) of the jobs run on the cluster: the image shards,
    then the caption shards `text_jobs()` plans from what they rejected."""
    finished: dict[str, float] = {}
    results: list[dict] = []
    counts = {"image": 0, "text": 0}

    def run(jobs: list[ShardJob]) -> None:
        t0 = time.perf_counter()

        def done(job: ShardJob, result: dict) -> None:
            results.append(result)
            finished[job.plan.modality] = time.perf_counter() - t0
            bar.update(len(job.plan.rows))

        for job in jobs:
            counts[job.plan.modality] += len(job.plan.rows)
        with tqdm(total=sum(len(job.plan.rows) for job in jobs), unit="item", desc=f"{len(jobs)} shards",
                  disable=not progress or not jobs, dynamic_ncols=True) as bar:
            cluster.run_jobs(client, extract_shard, jobs, [job.plan.name for job in jobs], done,
                             cluster.gpu_resources(client))

    run(image_jobs)
    run(text_jobs())
    timings = {}
    for modality, unit in (("image", "images"), ("text", "captions")):
        if counts[modality]:  # each timed from the start of its phase to its last shard
            timings[f"{unit}_s"] = finished[modality]
            timings[f"{unit}_per_s"] = counts[modality] / finished[modality]
    devices = sorted({r["device"] for r in results})
    execution = {"workers": len({r["worker"] for r in results}), "tasks": len(results)}
    return timings, merge_decode([r["decode"] for r in results if r["decode"]]), ",".join(devices), execution


def merge_decode(infos: list[dict]) -> dict | None:
    """The shards' decoding paths as one entry, the form an in-process run records."""
    if not infos:
        return None
    if all(i["path"] == "cpu" for i in infos) and len({i["why"] for i in infos}) == 1:
        return infos[0]
    gpu = [i for i in infos if i["path"] == "gpu"]
    if len(gpu) == len(infos):
        return {"path": "gpu", "batched": sum(i["batched"] for i in gpu), "pil": sum(i["pil"] for i in gpu)}
    return {"path": "mixed", "shards": infos}

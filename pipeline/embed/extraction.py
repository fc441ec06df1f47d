"""Stage one's plan and work on a dataset: what decides the shards (`extraction`), and once the stage knows it has
work to do, the shards planned, the pending ones made (here or on a dask cluster) and the manifest's fields read
from what they hold (`extract_work`). The extract stage runs it on a run's archive, `duch add` on the items added
to an archive (a segment)."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from duch.data import Dataset, Reject, read_dataset
from duch.data.scenes import read_scenes
from duch.data.stac import is_catalog, shown
from duch.data.text import MAX_CAPTION_CHARS
from duch.pipeline import DuchError
from duch.pipeline.compute import cluster
from duch.pipeline.compute.device import device_type, resolve_device
from duch.pipeline.config import ExtractConfig, manifest_config
from duch.pipeline.embed.distribute import ShardJob, encode_here, encode_on_cluster
from duch.pipeline.embed.inputs import images_content_digest, input_fingerprint, stale_error
from duch.pipeline.embed.plan import ExtractPlan, ForeignShards, ShardPlan, foreign_shards, mixed_runtime
from duch.pipeline.embed.sources import jpeg_share
from duch.pipeline.encoders import EncoderSpec, parse_spec
from duch.pipeline.encoders.context import count_truncated
from duch.pipeline.formats.shards import read_attrs, read_shard
from duch.pipeline.run.fingerprint import digest, normalized
from duch.pipeline.run.lock import sweep_temporaries
from duch.pipeline.run.manifest import library_versions
from duch.pipeline.run.stage import StageFolder, StagePlan


def read_inputs(cfg: ExtractConfig) -> Dataset:
    """The items `cfg.data` holds: GeoTIFF scenes (or a STAC catalog's items) cut into tiles with --tile, else a
    caption file or a folder."""
    if cfg.tile and is_catalog(cfg.data):
        from duch.data.stac_scenes import read_catalog

        return read_catalog(cfg.data, cfg.tile_options())
    return read_scenes(cfg.data, cfg.tile_options()) if cfg.tile else read_dataset(cfg.data, cfg.images)


def encoder_specs(cfg: ExtractConfig, runtime: str | None = None) -> tuple[EncoderSpec, EncoderSpec | None]:
    """The image encoder and the text encoder (None: no captions embedded) of an extraction, each with the runtime
    `runtime` (default `cfg.runtime`) resolves to for it on the run's device (the same on every dask worker: the
    specs travel)."""
    where, runtime = device_type(cfg.device), runtime or cfg.runtime
    image = parse_spec(cfg.image_encoder, "image").with_runtime(runtime, where)
    return image, parse_spec(cfg.text_encoder, "text").with_runtime(runtime, where) if cfg.text_encoder else None


@dataclass(frozen=True)
class Extraction:
    """One extraction: the items, the settings and encoders they are embedded with, and what decides the shards'
    bytes (basis, in the form the manifest keeps, and its fingerprint)."""

    cfg: ExtractConfig
    dataset: Dataset
    image_spec: EncoderSpec
    text_spec: EncoderSpec | None
    basis: dict
    fingerprint: str

    def confirmed(self, basis: dict, fingerprint: str) -> Extraction:
        """The same extraction under the basis a confirmed relisting recorded (embed/inputs.py)."""
        return dataclasses.replace(self, basis=basis, fingerprint=fingerprint)


def extraction(cfg: ExtractConfig, dataset: Dataset, runtime: str | None = None) -> Extraction:
    """`runtime`: what runs the encoders, in place of `cfg.runtime` (which the manifest keeps as the user chose)."""
    image_spec, text_spec = encoder_specs(cfg, runtime)
    basis = normalized({"settings": {**cfg.output_settings(), "image_encoder": image_spec.fingerprint(),
                                     "text_encoder": text_spec.fingerprint() if text_spec else None},
                        "inputs": input_fingerprint(dataset)})
    return Extraction(cfg, dataset, image_spec, text_spec, basis, digest(basis))


def extraction_plan(folder: StageFolder, job: Extraction, progress: bool, echo: Callable[[str], None],
                    started: float | None = None, foreign_cleared: bool = False) -> StagePlan:
    """The extract stage of `job` in `folder`; `foreign_cleared`: shards of other items (a killed add's) are
    removed rather than refused."""
    return StagePlan(
        job.basis, lambda: extract_work(folder, job, progress, echo, started), fingerprint=job.fingerprint,
        summary=lambda m: (f" ({m['counts']['images']} images, {m['counts']['captions']} captions, "
                           f"{m['counts']['rejects']} rejects)"),
        clear=(lambda: any(foreign_shards(folder.path, m, job.fingerprint) for m in ("image", "text")))
        if foreign_cleared else True, report=lambda m: report(m, folder.path, echo))


def extract_work(folder: StageFolder, job: Extraction, progress: bool, echo: Callable[[str], None],
                 started: float | None = None) -> dict:
    """Every shard of the extraction made in `folder` (finished ones of the same fingerprint kept); returns the
    manifest's fields. `started`: when the stage began (perf_counter), for the manifest's total time."""
    t_start = time.perf_counter() if started is None else started
    dataset, cfg, image_spec, text_spec, fingerprint = (job.dataset, job.cfg, job.image_spec, job.text_spec,
                                                        job.fingerprint)
    scheduler = cluster.SchedulerSpec.parse(cfg.scheduler)
    # Image shards first; the caption shards are planned from what they rejected (a caption goes with its image).
    plan = ExtractPlan(dataset, cfg, folder.path, fingerprint, text_spec is not None and dataset.has_captions)
    try:
        pending = plan.pending_images()
        note = plan.resume_note(pending)
        if note:
            echo(f"extract: {note}")
        specs = (image_spec if pending else None,
                 text_spec if plan.with_text and (pending or plan.pending_texts()) else None)
        if scheduler.kind == "none" or not any(specs):
            device = resolve_device(cfg.device)
            with cluster.torch_threads(cfg.threads):
                timings, image_decode = encode_here(pending, plan.pending_texts, specs, dataset, cfg, fingerprint,
                                                    folder.path, device, progress)
            execution = {"scheduler": "none"}
        else:
            share = jpeg_share(dataset.items)  # one pass over the archive, not one per shard

            def jobs(plans: list[ShardPlan]) -> list[ShardJob]:
                return [ShardJob(cfg, p, str(dataset.images_dir), str(folder.path), fingerprint, specs, share)
                        for p in plans]

            with cluster.connect(scheduler, cfg.device, echo, cfg.threads) as client:
                timings, image_decode, device, execution = encode_on_cluster(
                    client, jobs(pending), lambda: jobs(plan.pending_texts()), progress)
            execution["scheduler"] = str(scheduler)
            # A worker killed mid-shard leaves its temporary behind; its shard was redone elsewhere and every task
            # is finished, so no writer is left (and the run lock is still held).
            sweep_temporaries(folder.path)
    except ForeignShards:
        mixed = mixed_runtime(folder.path, {m: s.runtime for m, s in (("image", image_spec), ("text", text_spec)) if s})
        raise (DuchError(mixed) if mixed else stale_error(folder.path, None, job.basis)) from None

    plans = plan.shards
    shards = shard_summary(folder, plans, dataset)
    timings["total_s"] = time.perf_counter() - t_start
    return dict(
        config=manifest_config(cfg), device=str(device),
        versions=library_versions(),
        dataset={"kind": dataset.kind, "source": shown(cfg.data) if dataset.catalog else
                 str(Path(dataset.source).resolve()),
                 "images_dir": str(Path(dataset.images_dir).resolve())},
        encoders=shards["encoders"],
        runtime={m: s.runtime for m, s in (("image", image_spec), ("text", text_spec)) if s},
        # How this session's images were decoded (None: none were pending): gpu with how many files went the
        # batched way and how many to PIL, or cpu and why.
        image_decode=image_decode,
        counts=counts(plans, dataset, cfg, shards, text_spec),
        **({"scenes": scene_summary(dataset, shards["skipped"])} if cfg.tile else {}),
        outputs=shards["outputs"],
        # (a STAC catalog's files are its assets, remote ones too: its digest is the catalog's, in the basis)
        images_content_sha256=None if dataset.catalog else images_content_digest(dataset, progress),
        rejects=[{"id": r.id, "reason": r.reason} for r in shards["rejects"]],
        timings={k: round(v, 3) for k, v in timings.items()},
        execution=execution,  # where the work ran; like the timings, it never changes a shard
    )


def shard_summary(folder: StageFolder, plans: list[ShardPlan], dataset: Dataset) -> dict:
    """What the finished shards hold: rows per modality, encoder and dimension, rejects, and the outputs."""
    rows, encoders, rejects, outputs, skipped = {"image": 0, "text": 0}, {}, list(dataset.rejects), [], []
    rejected_images = set()
    for plan in plans:
        path = folder.path / plan.name
        attrs = read_attrs(path)
        rows[plan.modality] += int(attrs["rows"])
        encoders[plan.modality] = {"encoder": attrs["encoder"], "dim": int(attrs["dim"])}
        shard_rejects = read_shard(path, ("reject_id", "reject_reason"))
        rejects += [Reject(i, r) for i, r in zip(shard_rejects["reject_id"], shard_rejects["reject_reason"])]
        if plan.modality == "image":
            rejected_images.update(shard_rejects["reject_id"])
        if plan.modality == "image" and plan.rows and plan.rows[0].tile is not None:
            skipped += list(read_shard(path, ("skipped_id",))["skipped_id"])
        outputs.append((plan.name, {"modality": plan.modality, "rows": int(attrs["rows"])}))
    return {"rows": rows, "encoders": encoders, "rejects": rejects, "outputs": outputs, "skipped": skipped,
            "rejected_images": rejected_images}


def scene_summary(dataset: Dataset, skipped: list[str]) -> list[dict]:
    """Per scene: its size, CRS, bands, stretch and date (with where the date came from), and its tiles: how
    many were cut and how many skipped for too few valid pixels."""
    tiles, dropped = {}, {}
    for item in dataset.items:
        tiles[item.tile.scene.name] = tiles.get(item.tile.scene.name, 0) + 1
    for tile_id in skipped:
        scene = tile_id.rsplit("/", 1)[0]
        dropped[scene] = dropped.get(scene, 0) + 1
    return [{"scene": s.name, "file": s.file, "width": s.width, "height": s.height, "band_count": s.count,
             "dtype": s.dtype, "crs": s.crs, "bands": list(s.bands), "stretch": list(s.stretch) if s.stretch else None,
             "date": s.date, "date_source": s.date_source, "tiles": tiles.get(s.name, 0),
             "tiles_skipped": dropped.get(s.name, 0)} for s in dataset.scenes]


def counts(plans: list[ShardPlan], dataset: Dataset, cfg: ExtractConfig, shards: dict,
           text_spec: EncoderSpec | None) -> dict:
    n_aug = sum(1 for p in plans if p.modality == "text" for r in p.rows if r.augmented)
    # Counted from the plans (every caption row of the archive, not only this session's), with the tokenizer
    # alone: the same number whether the shards were written here, on a cluster, or by an earlier attempt.
    real_captions = [r.text for p in plans if p.modality == "text" for r in p.rows if not r.augmented]
    with_text = any(p.modality == "text" for p in plans)
    return {"items": len(dataset.items), "images": shards["rows"]["image"], "image_views": cfg.image_views,
            "captions": shards["rows"]["text"] - n_aug, "augmented_captions": n_aug, "rejects": len(shards["rejects"]),
            # captions longer than the text encoder reads: it sees only their first tokens
            "truncated_captions": count_truncated(text_spec, real_captions) if text_spec and real_captions else 0,
            # the caption rules (data/text.py): control characters removed; cut before tokenizing
            "cleaned_captions": dataset.caption_counts.get("cleaned_captions", 0),
            "capped_captions": dataset.caption_counts.get("capped_captions", 0),
            # captions left out with their rejected image
            "dropped_captions": sum(len(item.captions) for item in dataset.items
                                    if with_text and item.id in shards["rejected_images"]),
            **({"scenes": len(dataset.scenes), "tiles_skipped": len(shards["skipped"])} if cfg.tile else {})}


def report(manifest: dict, out_dir: Path, echo: Callable[[str], None]) -> None:
    """What a finished extraction made, and what of its input it skipped, cleaned or cut."""
    c, timings = manifest["counts"], manifest["timings"]
    rate = ", ".join(f"{timings[k]:.1f} {u}/s" for k, u in (("images_per_s", "images"), ("captions_per_s", "captions"))
                     if k in timings)
    echo(f"extract: {c['images']} images (+{c['image_views']} views each), {c['captions']} captions, "
         f"{c['rejects']} rejects in {manifest['timings']['total_s']:.1f} s ({rate or 'nothing to encode'}) "
         f"-> {out_dir}")
    if "scenes" in c:
        echo(f"extract: {c['images']} tiles from {c['scenes']} scenes; {c['tiles_skipped']} tiles skipped for too "
             f"few valid pixels (`min_valid`); per scene: 'scenes' in {out_dir / 'manifest.json'}")
    if c["rejects"]:
        dropped = f" (and the {c['dropped_captions']} captions of the rejected images)" if c["dropped_captions"] else ""
        echo(f"extract: warning: {c['rejects']} items skipped{dropped}; see 'rejects' in {out_dir / 'manifest.json'}")
    if c["cleaned_captions"] or c["capped_captions"]:
        echo(f"extract: note: {c['cleaned_captions']} captions had control characters removed, {c['capped_captions']} "
             f"were cut to {MAX_CAPTION_CHARS:,} characters (docs/stages.md, Bad input)")
    if c["truncated_captions"]:
        echo(f"extract: note: {c['truncated_captions']} of {c['captions']} captions are longer than the text encoder "
             "reads; each is embedded from its first tokens only")

"""The main job's stages: extract -> train-hash -> encode-archive -> evaluate."""
from __future__ import annotations

import functools

import click

from duch.pipeline.config import EncodeConfig, EvaluateConfig, ExtractConfig
from duch.pipeline.config.train import PAPER_TRAINING, TRAIN_RECIPES, TrainConfig

from .options import (
    cluster_options,
    device_option,
    floats,
    images_option,
    ints,
    option,
    runtime_option,
    say,
    some_bits,
    stage_options,
    user_errors,
)


@click.command()
@click.option("--data", required=True, type=click.Path(),
              help="Annotation file (.json caption format, .jsonl or .csv image,caption rows) or a folder "
                   "(holding one annotation file and images/, or only images); with --tile GeoTIFF scenes, or a "
                   "STAC Item/ItemCollection/Collection/Catalog JSON (path or http(s):// URL) or stac-geoparquet.")
@images_option
@click.option("--run", required=True, type=click.Path(), help="Run directory; writes RUN/extract.")
@option(ExtractConfig, "image_encoder", help="efficientnet-lite0, or open_clip:ARCH:WEIGHTS (tag, checkpoint path, "
                                             "or none).")
@option(ExtractConfig, "text_encoder", callback=lambda c, p, v: None if v.lower() == "none" else v,
        help="minilm-l6, open_clip:ARCH:WEIGHTS, or none for images only.")
@option(ExtractConfig, "image_views", help="Augmented views per image.")
@option(ExtractConfig, "seed", help="Seed of the augmentations.")
@option(ExtractConfig, "shard_size", help="Items per HDF5 shard.")
@option(ExtractConfig, "dtype", type=click.Choice(["float16", "float32"]))
@device_option(ExtractConfig)
@runtime_option(ExtractConfig)
@option(ExtractConfig, "batch_size", help="Images per batch.")
@option(ExtractConfig, "text_batch_size", help="Captions per batch.")
@option(ExtractConfig, "workers", type=int,
        help="Image loading (PIL path) and tokenising processes [default: spare cores, max 8].")
@option(ExtractConfig, "decode", type=click.Choice(["auto", "gpu", "cpu"]),
        help="gpu: JPEGs decoded (nvJPEG) and resized in batches on the GPU; cpu: PIL in worker processes; auto: gpu "
             "on a CUDA device for a JPEG archive with --image-views 0. Same embeddings within float16 rounding.")
@option(ExtractConfig, "tile", metavar="PIXELS",
        help="Read --data as GeoTIFF scenes (a folder, a .tif, or a .txt list of them) cut into tiles of this many "
             "pixels a side, each an item SCENE/ROW_COL with its footprint and date (0: images).")
@option(ExtractConfig, "stride", metavar="PIXELS", show_default=False,
        help="Pixels between tiles [default: the tile size].")
@option(ExtractConfig, "bands", callback=functools.partial(ints, example="4,3,2"),
        help="Scene bands read as R,G,B, counted from 1 (e.g. 4,3,2 for Sentinel-2), or one for grey "
             "[default: 1,2,3].")
@option(ExtractConfig, "min_valid",
        help="Share of a tile's pixels that must be valid (not nodata); tiles below are skipped and counted.")
@option(ExtractConfig, "date", metavar="YYYY-MM-DD",
        help="Acquisition date of scenes with none in a sidecar or their metadata.")
@click.option("--allow-ungeoreferenced", is_flag=True,
              help="Accept scenes without a CRS: their tiles get footprints in pixels and match no --bbox.")
@option(ExtractConfig, "nodata", type=float, metavar="VALUE",
        help="The fill value of bands without a nodata tag (e.g. 0 for Landsat): not valid, never stretched.")
@option(ExtractConfig, "assets", callback=lambda c, p, v: tuple(a.strip() for a in (v or "").split(",") if a.strip()),
        help="A STAC item's assets read as R,G,B (or one, grey): asset keys or eo:bands common names "
             "[default: red,green,blue].")
@option(ExtractConfig, "max_cloud", type=float, metavar="PCT", help="Skip STAC items with eo:cloud_cover above it.")
@option(ExtractConfig, "bbox", metavar="MINLON,MINLAT,MAXLON,MAXLAT", callback=floats,
        help="Only the items and tiles overlapping this lon/lat box (the rest is never read).")
@option(ExtractConfig, "date_from", metavar="YYYY-MM-DD", help="Only scenes (items) acquired on or after this date.")
@option(ExtractConfig, "date_to", metavar="YYYY-MM-DD", help="Only scenes (items) acquired on or before this date.")
@cluster_options(ExtractConfig)
@stage_options
@user_errors
def extract(force, wait, no_progress, **settings):
    """Stage 1: cache image and text embeddings (with augmented views) in HDF5 shards."""
    from duch.stages.extract import extract as run_extract

    run_extract(ExtractConfig(**settings), force=force, progress=not no_progress, echo=say, wait=wait)


@click.command("train-hash")
@click.option("--run", required=True, type=click.Path(), help="Run directory with a finished extract.")
@option(TrainConfig, "bits", callback=ints, help="Code lengths, comma-separated multiples of 8.")
@option(TrainConfig, "split", type=click.Choice(["paper", "dataset", "all"]),
        help="paper: seed-42 50% train, 20%/80% of the rest query/database; dataset: its split field; all: train on "
             "everything, no evaluation.")
@click.option("--recipe", default="duch", show_default=True, type=click.Choice(list(TRAIN_RECIPES)),
              help="duch: the settings that measured best on UCM (docs/results.md); paper: DUCH's published ones "
                   "(batch 256, 100 epochs, lr decay at 50, quantization 0.001 at every code length).")
@click.option("--epochs", type=int,
              help=f"[default: the recipe's: {TrainConfig.epochs}, paper {PAPER_TRAINING['epochs']}]")
@click.option("--batch-size", type=int,
              help=f"[default: the recipe's: {TrainConfig.batch_size}, paper {PAPER_TRAINING['batch_size']}]")
@option(TrainConfig, "hidden", help="Width of the heads' hidden layer.")
@click.option("--tau", type=float, help=f"NT-Xent temperature [default: {TrainConfig.tau:g}].")
@option(TrainConfig, "seed")
@option(TrainConfig, "precision", type=click.Choice(["auto", "bf16", "fp32"]),
        help="bf16 autocast for the heads (auto: on a GPU or a CPU with native bf16), or fp32.")
@click.option("--reference-quirks", is_flag=True, help="Reproduce the public reference code's two defects.")
@click.option("--no-cuda-graphs", is_flag=True, help="GPU: run the steps eagerly instead of replaying CUDA graphs.")
@click.option("--compile", "compile_terms", is_flag=True,
              help="GPU: torch.compile the loss terms (+10% steps/s, ~20 s to compile per code length).")
@option(TrainConfig, "eval_every", help="Epochs between validation mAPs.")
@option(TrainConfig, "checkpoint_every", help="Epochs between checkpoints a killed run resumes from (0: none).")
@device_option(TrainConfig)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Any other setting of pipeline.config.TrainConfig, over the recipe; repeat for more (e.g. --set "
                   "w_inter_all=2 --set beta=0.005).")
@stage_options
@user_errors
def train_hash(recipe, epochs, batch_size, tau, no_cuda_graphs, overrides, force, wait, no_progress, **settings):
    """Stage 2: train DUCH hashing heads on the cached features, one model per code length."""
    from duch.pipeline.config import parse_overrides
    from duch.stages.train_hash import train_hash as run_train

    own_options = ("bits", "split", "epochs", "batch_size", "hidden", "tau", "seed", "precision", "reference_quirks")
    given = {k: v for k, v in dict(epochs=epochs, batch_size=batch_size, tau=tau).items() if v is not None}
    given |= parse_overrides(overrides, TrainConfig, reserved=own_options)
    cfg = TrainConfig.recipe(recipe, cuda_graphs=not no_cuda_graphs, **settings, **given)
    run_train(cfg, force=force, progress=not no_progress, echo=say, wait=wait)


@click.command("encode-archive")
@click.option("--run", required=True, type=click.Path(), help="Run directory with a trained train-hash.")
@option(EncodeConfig, "archive", type=click.Path(),
        help="Run directory of another extract run to encode with this model (same encoders); its codes go to "
             "ARCHIVE/encode-archive [default: RUN itself].")
@option(EncodeConfig, "bits", callback=some_bits, help="Code lengths to encode [default: every trained one].")
@click.option("--continuous", is_flag=True, help="Also store the heads' float16 outputs (for search --rerank).")
@option(EncodeConfig, "index", type=click.Choice(["flat", "ivf", "hnsw"]),
        help="Also write a faiss index per code length for CPU search: flat (exact), ivf or hnsw (approximate, for "
             "archives of ~100M codes and more).")
@device_option(EncodeConfig)
@option(EncodeConfig, "batch_size")
@cluster_options(EncodeConfig)
@stage_options
@user_errors
def encode_archive(force, wait, no_progress, **settings):
    """Stage 3: packed binary codes of every archive item, one file per code length."""
    from duch.stages.encode_archive import encode_archive as run_encode

    run_encode(EncodeConfig(**settings), force=force, progress=not no_progress, echo=say, wait=wait)


@click.command()
@click.option("--run", required=True, type=click.Path(), help="Run directory with encode-archive codes.")
@option(EvaluateConfig, "bits", callback=some_bits, help="Code lengths to evaluate [default: every encoded one].")
@option(EvaluateConfig, "k", "-k", "--k", help="mAP@K.")
@option(EvaluateConfig, "rerank",
        help="Also rank with this Hamming shortlist re-ranked by the continuous outputs (0: off).")
@stage_options
@user_errors
def evaluate(force, wait, no_progress, **settings):
    """mAP@K, precision curves and instance-level Recall@K on the run's held-out split; plots and metrics.json."""
    from duch.stages.evaluate import evaluate as run_evaluate

    run_evaluate(EvaluateConfig(**settings), force=force, progress=not no_progress, echo=say, wait=wait)


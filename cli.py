"""duch command line: thin click wrappers over the Python API (`stages.*`)."""
from __future__ import annotations

import functools
import sys

import click

from data import DatasetError
from pipeline import DuchError


def user_errors(fn):
    """A mistake a user can fix is one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (DuchError, DatasetError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """duch: unsupervised contrastive hashing for cross-modal retrieval in remote-sensing archives."""


@main.command()
@click.option("--data", required=True, type=click.Path(),
              help="Annotation file (.json caption format, .jsonl or .csv image,caption rows) or a folder "
                   "(holding one annotation file and images/, or only images).")
@click.option("--images", type=click.Path(), default=None, help="Images folder, when not beside the annotation.")
@click.option("--run", "run_dir", required=True, type=click.Path(), help="Run directory; writes RUN/extract.")
@click.option("--image-encoder", default="efficientnet-lite0", show_default=True,
              help="efficientnet-lite0, or open_clip:ARCH:WEIGHTS (tag, checkpoint path, or none).")
@click.option("--text-encoder", default="minilm-l6", show_default=True,
              help="minilm-l6, open_clip:ARCH:WEIGHTS, or none for images only.")
@click.option("--image-views", default=2, show_default=True, type=int, help="Augmented views per image.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the augmentations.")
@click.option("--shard-size", default=4096, show_default=True, type=int, help="Items per HDF5 shard.")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Images per batch.")
@click.option("--text-batch-size", default=512, show_default=True, type=int, help="Captions per batch.")
@click.option("--workers", default=None, type=int, help="Image loading processes [default: spare cores, max 8].")
@click.option("--force", is_flag=True, help="Redo the stage even if it is finished or made from other settings.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@user_errors
def extract(data, images, run_dir, image_encoder, text_encoder, image_views, seed, shard_size, dtype, device,
            batch_size, text_batch_size, workers, force, no_progress):
    """Stage 1: cache image and text embeddings (with augmented views) in HDF5 shards."""
    from pipeline.config import ExtractConfig
    from stages.extract import extract as run_extract

    cfg = ExtractConfig(data=data, images=images, run=run_dir, image_encoder=image_encoder,
                        text_encoder=None if text_encoder.lower() == "none" else text_encoder,
                        image_views=image_views, seed=seed, shard_size=shard_size, dtype=dtype, device=device,
                        batch_size=batch_size, text_batch_size=text_batch_size, workers=workers)
    run_extract(cfg, force=force, progress=not no_progress, echo=click.echo)


def _bits(ctx, param, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in value.split(",") if b.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 16,32,64,128, got {value!r}") from None


@main.command("train-hash")
@click.option("--run", "run_dir", required=True, type=click.Path(), help="Run directory with a finished extract.")
@click.option("--bits", default="16,32,64,128", show_default=True, callback=_bits,
              help="Code lengths, comma-separated multiples of 8.")
@click.option("--split", default="paper", show_default=True, type=click.Choice(["paper", "dataset", "all"]),
              help="paper: seed-42 50% train, 20%/80% of the rest query/database; dataset: its split field; "
                   "all: train on everything, no evaluation.")
@click.option("--epochs", default=100, show_default=True, type=int)
@click.option("--batch-size", default=256, show_default=True, type=int)
@click.option("--hidden", default=4096, show_default=True, type=int, help="Width of the heads' hidden layer.")
@click.option("--tau", default=None, type=float, help="NT-Xent temperature [default: the config's].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp32"]),
              help="bf16 autocast for the heads (auto: on a GPU or a CPU with native bf16), or fp32.")
@click.option("--reference-quirks", is_flag=True, help="Reproduce the public reference code's two defects.")
@click.option("--eval-every", default=10, show_default=True, type=int, help="Epochs between validation mAPs.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--force", is_flag=True, help="Retrain even if finished.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@user_errors
def train_hash(run_dir, bits, split, epochs, batch_size, hidden, tau, seed, precision, reference_quirks, eval_every,
               device, force, no_progress):
    """Stage 2: train DUCH hashing heads on the cached features, one model per code length."""
    from pipeline.config import TrainConfig
    from stages.train_hash import train_hash as run_train

    extra = {} if tau is None else {"tau": tau}
    cfg = TrainConfig(run=run_dir, bits=bits, split=split, epochs=epochs, batch_size=batch_size, hidden=hidden,
                      seed=seed, precision=precision, reference_quirks=reference_quirks, eval_every=eval_every,
                      device=device, **extra)
    run_train(cfg, force=force, progress=not no_progress, echo=click.echo)


if __name__ == "__main__":
    main()

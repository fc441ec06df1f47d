"""A growing archive: add, remove, compact (each publishes a new generation)."""
from __future__ import annotations

import click

from duch.pipeline.config import AddConfig, CompactConfig

from .options import (
    cluster_options,
    device_option,
    images_option,
    option,
    progress_option,
    runtime_option,
    say,
    user_errors,
    wait_option,
)


@click.command()
@click.option("--run", required=True, type=click.Path(), help="An encoded run whose archive grows.")
@click.option("--data", required=True, type=click.Path(), help="The new items: the same forms as extract's --data.")
@images_option
@click.option("--replace", is_flag=True,
              help="Items already in the archive whose file changed are coded again (without it they are refused).")
@device_option(AddConfig)
@runtime_option(AddConfig)
@option(AddConfig, "batch_size", help="Images per batch.")
@option(AddConfig, "workers", type=int, help="Image loading processes [default: spare cores, max 8].")
@cluster_options(AddConfig)
@wait_option
@progress_option
@user_errors
def add(wait, no_progress, **settings):
    """Add items to an encoded archive: extracted and coded as its own were, published as a new generation."""
    from duch.stages.add import add as run_add

    run_add(AddConfig(**settings), progress=not no_progress, echo=say, wait=wait)


@click.command()
@click.option("--run", required=True, type=click.Path(), help="An encoded run.")
@click.argument("ids", nargs=-1)
@click.option("--ids", "ids_file", type=click.File("r", encoding="utf-8"), help="A file of image ids, one a line.")
@wait_option
@user_errors
def remove(run, ids, ids_file, wait):
    """Remove items (image ids; their captions go with them) from an encoded archive: a new generation."""
    from duch.pipeline.config import RemoveConfig
    from duch.stages.remove import remove as run_remove

    listed = [line.strip() for line in ids_file] if ids_file else []
    run_remove(RemoveConfig(run=run, ids=tuple(ids) + tuple(i for i in listed if i)), echo=say, wait=wait)


@click.command()
@click.option("--run", required=True, type=click.Path(), help="An encoded run.")
@option(CompactConfig, "small",
        help="Segments of fewer items are merged (segments with removed items are always rewritten).")
@wait_option
@user_errors
def compact(wait, **settings):
    """Rewrite an archive's segments without their removed items, merging small ones: a new generation."""
    from duch.stages.compact import compact as run_compact

    run_compact(CompactConfig(**settings), echo=say, wait=wait)


"""`duch stac-items`: a STAC ItemCollection of one's own GeoTIFFs (COGs), for `extract --data`."""
from __future__ import annotations

from pathlib import Path

import click

from .options import say, user_errors


@click.command("stac-items")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="The ItemCollection JSON to write (hrefs relative to it: serve its folder as it is).")
@click.option("--common-names", default="", metavar="NAME,...",
              help="Each band's common name (e.g. red,green,blue,nir) [default: the files' colour interpretation].")
@click.option("--date", default=None, metavar="YYYY-MM-DD", help="The date of files with none of their own.")
@click.option("--collection", default=None, help="The items' collection id.")
@user_errors
def stac_items(files, out, common_names, date, collection):
    """One STAC Item per GeoTIFF (footprint, date, bands by common name) in one ItemCollection."""
    from duch.data.stac_write import write_item_collection

    names = tuple(n.strip() for n in common_names.split(",") if n.strip())
    n = write_item_collection([Path(f) for f in files], Path(out), names, date, collection)
    say(f"stac-items: {n} items -> {out}; extract them with --data {out} --tile 256")

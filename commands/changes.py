"""What changed between two dates of a scene archive, from the command line, over the Python API the service uses."""
from __future__ import annotations

import click

from duch.pipeline.config import ServeConfig

from .options import option, user_errors


@click.command()
@click.option("--run", "run_dir", required=True, type=click.Path(),
              help="Run directory with encode-archive codes of scene tiles.")
@option(ServeConfig, "bits", help="Which code length to compare.")
@click.option("--from", "from_date", required=True, metavar="YYYY-MM-DD", help="The first date: its tiles...")
@click.option("--to", "to_date", required=True, metavar="YYYY-MM-DD", help="...paired with this date's by footprint.")
@click.option("-k", "--k", default=20, show_default=True, type=int, help="How many pairs, most changed first.")
@click.option("--bbox", default=None, metavar="MINLON,MINLAT,MAXLON,MAXLAT",
              help="Only pairs with a tile whose footprint overlaps this lon/lat box.")
@click.option("--inside", is_flag=True, help="With --bbox: a tile must lie wholly inside the box.")
@click.option("--min-iou", default=0.5, show_default=True, type=float,
              help="Tiles of different grids pair when their footprints' intersection over union is at least this.")
@click.option("--rerank", is_flag=True,
              help="Order the pairs by the cosine of their continuous outputs (needs encode --continuous); by "
                   "default by Hamming distance, equal distances by that cosine where it is stored.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--geojson", "as_geojson", is_flag=True,
              help="Print the pairs as a GeoJSON FeatureCollection of their footprints.")
@click.option("--no-verify", is_flag=True, help="Check the code files' sizes only, not their SHA-256.")
@user_errors
def changes(run_dir, bits, from_date, to_date, k, bbox, inside, min_iou, rerank, as_json, as_geojson, no_verify):
    """Tiles that changed between two dates: pairs of tiles of one place ranked by the Hamming distance of their
    codes. Tiles without a partner on the other date are counted and listed (--json), never dropped unsaid."""
    import json as _json

    from duch.pipeline.retrieval.changes import changes_geojson, check_changes, find_changes
    from duch.pipeline.retrieval.filters import PlaceFilter
    from duch.pipeline.retrieval.search import Index

    if as_json and as_geojson:
        raise click.UsageError("give one of --json and --geojson")
    check_changes(from_date, to_date, k, min_iou)  # before the archive is opened
    places = PlaceFilter.parse(bbox, inside=inside)
    index = Index.load(run_dir, bits=bits, device="cpu", verify=not no_verify)
    found = find_changes(index, from_date, to_date, k=k, places=places, rerank=rerank, min_iou=min_iou)
    if as_geojson:
        click.echo(_json.dumps(changes_geojson(found), indent=1))
        return
    if as_json:
        click.echo(_json.dumps(found.to_dict(), indent=1))
        return
    where = f", {places.describe()}" if places.active else ""
    click.echo(f"{found.from_date} -> {found.to_date}{where}: {found.matched} pairs of {found.tiles['from']} and "
               f"{found.tiles['to']} tiles ({bits} bits, {'by cosine' if rerank else 'most changed first'})")
    for p in found.pairs:
        score = f"  cos {p.score:.3f}" if p.score is not None else ""
        overlap = f"  iou {p.iou:.2f}" if p.iou < 0.995 else ""
        click.echo(f"{p.rank:>3}. d={p.distance:<3}{score}{overlap}  {p.before.id}  ->  {p.after.id}")
    for side, date in zip(("from", "to"), (found.from_date, found.to_date)):
        ids = found.unpaired[side]
        if ids:
            shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more (--json lists them)" if len(ids) > 5 else "")
            click.echo(f"unpaired on {date}: {len(ids)} tiles with no partner on the other date: {shown}")

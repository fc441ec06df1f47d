"""One search from the command line, over the Python API the service uses too."""
from __future__ import annotations

import click

from duch.pipeline.config import ServeConfig

from .options import device_option, option, runtime_option, user_errors


@click.command()
@click.option("--run", "run_dir", required=True, type=click.Path(), help="Run directory with encode-archive codes.")
@option(ServeConfig, "bits", help="Which code length to search.")  # the service's default too
@click.option("--text", default=None, help="A caption to search by.")
@click.option("--image", type=click.Path(), default=None, help="An image file to search by.")
@click.option("--id", "item_id", default=None, help="An archive item to search by: an image id, or IMAGE_ID#N for "
                                                    "its N-th caption.")
@click.option("-k", "--k", default=10, show_default=True, type=int, help="How many results.")
@click.option("--modality", type=click.Choice(["image", "text"]), default=None,
              help="What to return [default: the other modality than the query's].")
@click.option("--rerank", default=0, show_default=True, type=int,
              help="Re-rank this many Hamming neighbours by the continuous outputs (needs encode --continuous).")
@click.option("--ties", default="adaptive", show_default=True, type=click.Choice(["adaptive", "order"]),
              help="Equal distances: by the query's confidence in the bits that differ (adaptive: the archive "
                   "needs nothing more), or in archive order.")
@click.option("--bbox", default=None, metavar="MINLON,MINLAT,MAXLON,MAXLAT",
              help="Scene tiles only: those whose footprint overlaps this lon/lat box (applied before the top k).")
@click.option("--inside", is_flag=True, help="With --bbox: only tiles whose footprint lies wholly inside the box.")
@click.option("--date-from", default=None, metavar="YYYY-MM-DD", help="Scene tiles acquired on or after this date.")
@click.option("--date-to", default=None, metavar="YYYY-MM-DD", help="Scene tiles acquired on or before this date.")
@click.option("--near", default=None, metavar="LON,LAT,METRES",
              help="Scene tiles only: those whose footprint lies within METRES (great-circle) of the point; 0: the "
                   "tiles that contain it (applied before the top k).")
@click.option("--positive", "positives", multiple=True, metavar="ID[,ID...]",
              help="An archive image marked right: refines the query (or, alone, searches by the marked images). "
                   "Repeatable, or a comma list.")
@click.option("--negative", "negatives", multiple=True, metavar="ID[,ID...]",
              help="An archive image marked wrong. Repeatable, or a comma list.")
@click.option("--exclude-marked", is_flag=True, help="Leave the --positive and --negative images out of the results.")
@click.option("--rocchio", default=None, metavar="ALPHA,BETA,GAMMA",
              help="Weights of the query, the positives' mean and the negatives' mean [default: 1,1,0.25].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--geojson", "as_geojson", is_flag=True,
              help="Print the hits as a GeoJSON FeatureCollection of their footprints (scene tiles).")
@device_option(ServeConfig)  # a search codes its query as the service does
@runtime_option(ServeConfig)
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "faiss", "numpy"]),
              help="CPU scan: faiss IndexBinaryFlat (auto, when installed) or numpy over the memory-mapped codes.")
@click.option("--no-verify", is_flag=True,
              help="Check the code and index files' sizes only, not their SHA-256 against the manifest (hashing "
                   "billions of codes takes minutes).")
@user_errors
def search(run_dir, bits, text, image, item_id, k, modality, rerank, ties, bbox, inside, date_from, date_to, near,
           positives, negatives, exclude_marked, rocchio, as_json, as_geojson, device, runtime, backend, no_verify):
    """Search the archive by text, image or item id: top-k by Hamming distance."""
    import json as _json

    from duch.pipeline.retrieval.filters import PlaceFilter, search_places
    from duch.pipeline.retrieval.geojson import geojson
    from duch.pipeline.retrieval.queries import check_query
    from duch.pipeline.retrieval.refine import Feedback
    from duch.pipeline.retrieval.search import Index

    weights = rocchio.split(",") if rocchio is not None else None
    try:
        weights = [float(w) for w in weights] if weights is not None else None
    except ValueError:
        raise click.BadParameter(f"{rocchio!r}: give three weights ALPHA,BETA,GAMMA", param_hint="--rocchio") from None
    feedback = Feedback.parse(positives, negatives, weights, exclude_marked)
    check_query(text, image, item_id, k, rerank, feedback=feedback.active)  # before the archive is opened
    if as_json and as_geojson:
        raise click.UsageError("give one of --json and --geojson")
    places = PlaceFilter.parse(bbox, date_from, date_to, inside, near)  # checked before the archive is opened
    index = Index.load(run_dir, bits=bits, device=device, backend=backend, verify=not no_verify, runtime=runtime)
    query = (text if text is not None else image if image is not None else f"item {item_id}" if item_id is not None
             else "marked examples")
    if feedback.active:
        query = f"{query}, {len(feedback.positives)} right and {len(feedback.negatives)} wrong marked"
    hits, matched = search_places(index, places, need_places=as_geojson, text=text, image=image, id=item_id, k=k,
                                  modality=modality, rerank_top=rerank, ties=ties, positives=feedback.positives,
                                  negatives=feedback.negatives, exclude_marked=exclude_marked,
                                  rocchio=feedback.weights)
    if places.active:  # on stderr beside a JSON document, so that stdout stays the document
        total = len(index.tables["image"])
        click.echo(f"filter: {matched} of {total} tiles match {places.describe()}", err=as_json or as_geojson)
    if as_geojson:
        click.echo(_json.dumps(geojson(hits, matched, query), indent=1))
        return
    if as_json:
        click.echo(_json.dumps([h.to_dict() for h in hits], indent=1))
        return
    adaptive = not rerank and any(h.score is not None for h in hits)
    order = (", re-ranked by cosine" if rerank else
             ", equal distances by the query's confidence w on the differing bits" if adaptive else "")
    click.echo(f"query: {query!r}  ({bits} bits, Hamming distance{order})")
    for h in hits:
        score = f"  {'cos' if rerank else 'w'} {h.score:.3f}" if h.score is not None else ""
        what = h.caption if h.caption is not None else h.path
        if h.place is not None:  # a scene tile: where it is instead of the scene's path
            where = (",".join(f"{v:.5f}" for v in h.place.bounds) if h.place.bounds
                     else f"pixels {','.join(map(str, h.place.window))}")
            what = f"{h.place.date or 'no date':<10}  {where}"
        click.echo(f"{h.rank:>3}. d={h.distance:<3}{score}  {h.id:<12} {h.label or '':<18} {what}")


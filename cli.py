"""duch command line: thin click wrappers over the Python API (`duch.stages.*`, `duch.pipeline.retrieval`)."""
from __future__ import annotations

import functools
import sys

if __name__ == "__main__":  # `python cli.py ...` runs this checkout, installed or not: its folders are duch's
    import pathlib
    import types

    sys.modules["duch"] = types.ModuleType("duch")
    sys.modules["duch"].__path__ = [str(pathlib.Path(__file__).resolve().parent)]

import click

from duch.data import DatasetError
from duch.pipeline import DuchError
from duch.pipeline.errors import spelled


def user_errors(fn):
    """A mistake a user can fix is one line on stderr and exit code 2, never a traceback. A full disk or a folder
    without write permission is one of those, wherever the write happened (pipeline.storage words it)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from duch.pipeline.run.storage import storage_error

        try:
            return fn(*args, **kwargs)
        except (DuchError, DatasetError) as e:
            click.echo(f"error: {spelled(str(e), 'cli')}", err=True)
            sys.exit(2)
        except OSError as e:
            translated = storage_error(e)
            if translated is None:
                raise
            click.echo(f"error: {translated}", err=True)
            sys.exit(2)

    return wrapper


class OneLineErrors(click.Group):
    """Usage mistakes (a bad option value, a missing option) as one line too, instead of click's usage block."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx else ctx.command_path
            click.echo(f"error: {e.format_message()} (see {where} --help)", err=True)
            sys.exit(2)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """duch: unsupervised contrastive hashing for cross-modal retrieval in remote-sensing archives."""


def wait_option(command):
    """--wait: every command that takes the run lock."""
    return click.option("--wait", default=0.0, show_default=True, type=float, metavar="SECONDS",
                        help="When another duch process holds the run, wait up to this long for it.")(command)


def progress_option(command):
    return click.option("--no-progress", is_flag=True, help="No progress bars.")(command)


def stage_options(command):
    """--force, --wait and --no-progress: what every stage that keeps its outputs takes."""
    command = wait_option(progress_option(command))
    return click.option("--force", is_flag=True, help="Redo the stage even if it is finished or made from other "
                                                      "settings.")(command)


def cluster_options(command):
    """--scheduler and --threads, for the stages that run one task per shard (docs/cluster.md)."""
    command = click.option(
        "--threads", default=None, type=int,
        help="Torch threads per encoding process [default: all cores; on a local cluster, cores / N]. Runs "
             "compared bit for bit on CPU use the same count.")(command)
    return click.option(
        "--scheduler", default="none", show_default=True,
        help="Where the per-shard tasks run: none (this process), local[:N] (a dask LocalCluster of N worker "
             "processes, one per GPU by default) or a running dask scheduler's address, tcp://host:8786 "
             "(outputs must then be on storage every worker reaches; see docs/cluster.md).")(command)


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
@click.option("--workers", default=None, type=int,
              help="Image loading (PIL path) and tokenising processes [default: spare cores, max 8].")
@click.option("--decode", default="auto", show_default=True, type=click.Choice(["auto", "gpu", "cpu"]),
              help="gpu: JPEGs decoded (nvJPEG) and resized in batches on the GPU; cpu: PIL in worker processes; "
                   "auto: gpu on a CUDA device for a JPEG archive with --image-views 0. Same embeddings "
                   "within float16 rounding.")
@click.option("--tile", default=0, show_default=True, type=int, metavar="PIXELS",
              help="Read --data as GeoTIFF scenes (a folder, a .tif, or a .txt list of them) cut into tiles of "
                   "this many pixels a side, each an item SCENE/ROW_COL with its footprint and date (0: images).")
@click.option("--stride", default=0, type=int, metavar="PIXELS", help="Pixels between tiles [default: the tile size].")
@click.option("--bands", default="", callback=lambda c, p, v: _ints(c, p, v, "4,3,2"),
              help="Scene bands read as R,G,B, counted from 1 (e.g. 4,3,2 for Sentinel-2), or one for grey "
                   "[default: 1,2,3].")
@click.option("--min-valid", default=0.9, show_default=True, type=float,
              help="Share of a tile's pixels that must be valid (not nodata); tiles below are skipped and counted.")
@click.option("--date", default=None, metavar="YYYY-MM-DD",
              help="Acquisition date of scenes with none in a sidecar or their metadata.")
@click.option("--allow-ungeoreferenced", is_flag=True,
              help="Accept scenes without a CRS: their tiles get footprints in pixels and match no --bbox.")
@cluster_options
@stage_options
@user_errors
def extract(data, images, run_dir, image_encoder, text_encoder, image_views, seed, shard_size, dtype, device,
            batch_size, text_batch_size, workers, decode, tile, stride, bands, min_valid, date, allow_ungeoreferenced,
            scheduler, threads, force, wait, no_progress):
    """Stage 1: cache image and text embeddings (with augmented views) in HDF5 shards."""
    from duch.pipeline.config import ExtractConfig
    from duch.stages.extract import extract as run_extract

    cfg = ExtractConfig(data=data, images=images, run=run_dir, image_encoder=image_encoder,
                        text_encoder=None if text_encoder.lower() == "none" else text_encoder,
                        image_views=image_views, seed=seed, shard_size=shard_size, dtype=dtype, device=device,
                        batch_size=batch_size, text_batch_size=text_batch_size, workers=workers, decode=decode,
                        tile=tile, stride=stride, bands=bands, min_valid=min_valid, date=date,
                        allow_ungeoreferenced=allow_ungeoreferenced, scheduler=scheduler, threads=threads)
    run_extract(cfg, force=force, progress=not no_progress, echo=click.echo, wait=wait)


def _ints(ctx, param, value: str, example: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in value.split(",") if b.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as {example}, got {value!r}") from None


def _bits(ctx, param, value: str) -> tuple[int, ...]:
    return _ints(ctx, param, value, "16,32,64,128")


@main.command("train-hash")
@click.option("--run", "run_dir", required=True, type=click.Path(), help="Run directory with a finished extract.")
@click.option("--bits", default="16,32,64,128", show_default=True, callback=_bits,
              help="Code lengths, comma-separated multiples of 8.")
@click.option("--split", default="paper", show_default=True, type=click.Choice(["paper", "dataset", "all"]),
              help="paper: seed-42 50% train, 20%/80% of the rest query/database; dataset: its split field; "
                   "all: train on everything, no evaluation.")
@click.option("--recipe", default="duch", show_default=True, type=click.Choice(["duch", "paper"]),
              help="duch: the settings that measured best on UCM (docs/results.md); paper: DUCH's published ones "
                   "(batch 256, 100 epochs, lr decay at 50, quantization 0.001 at every code length).")
@click.option("--epochs", default=None, type=int, help="[default: the recipe's: 50, paper 100]")
@click.option("--batch-size", default=None, type=int, help="[default: the recipe's: 128, paper 256]")
@click.option("--hidden", default=4096, show_default=True, type=int, help="Width of the heads' hidden layer.")
@click.option("--tau", default=None, type=float, help="NT-Xent temperature [default: 1].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp32"]),
              help="bf16 autocast for the heads (auto: on a GPU or a CPU with native bf16), or fp32.")
@click.option("--reference-quirks", is_flag=True, help="Reproduce the public reference code's two defects.")
@click.option("--no-cuda-graphs", is_flag=True, help="GPU: run the steps eagerly instead of replaying CUDA graphs.")
@click.option("--compile", "compile_terms", is_flag=True,
              help="GPU: torch.compile the loss terms (+10% steps/s, ~20 s to compile per code length).")
@click.option("--eval-every", default=10, show_default=True, type=int, help="Epochs between validation mAPs.")
@click.option("--checkpoint-every", default=10, show_default=True, type=int,
              help="Epochs between checkpoints a killed run resumes from (0: none).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Any other setting of pipeline.config.TrainConfig, over the recipe; repeat for more (e.g. --set "
                   "w_inter_all=2 --set beta=0.005).")
@stage_options
@user_errors
def train_hash(run_dir, bits, split, recipe, epochs, batch_size, hidden, tau, seed, precision, reference_quirks,
               no_cuda_graphs, compile_terms, eval_every, checkpoint_every, device, overrides, force, wait,
               no_progress):
    """Stage 2: train DUCH hashing heads on the cached features, one model per code length."""
    from duch.pipeline.config import TrainConfig, parse_overrides
    from duch.stages.train_hash import train_hash as run_train

    own_options = ("bits", "split", "epochs", "batch_size", "hidden", "tau", "seed", "precision", "reference_quirks")
    given = {k: v for k, v in dict(epochs=epochs, batch_size=batch_size, tau=tau).items() if v is not None}
    given |= parse_overrides(overrides, TrainConfig, reserved=own_options)
    cfg = TrainConfig.recipe(recipe, run=run_dir, bits=bits, split=split, hidden=hidden, seed=seed,
                             precision=precision, reference_quirks=reference_quirks, eval_every=eval_every,
                             checkpoint_every=checkpoint_every, device=device, cuda_graphs=not no_cuda_graphs,
                             compile_terms=compile_terms, **given)
    run_train(cfg, force=force, progress=not no_progress, echo=click.echo, wait=wait)


@main.command("encode-archive")
@click.option("--run", "run_dir", required=True, type=click.Path(), help="Run directory with a trained train-hash.")
@click.option("--archive", type=click.Path(), default=None,
              help="Run directory of another extract run to encode with this model (same encoders); "
                   "its codes go to ARCHIVE/encode-archive [default: RUN itself].")
@click.option("--bits", default="", callback=lambda c, p, v: _bits(c, p, v) or None,
              help="Code lengths to encode [default: every trained one].")
@click.option("--continuous", is_flag=True, help="Also store the heads' float16 outputs (for search --rerank).")
@click.option("--index", type=click.Choice(["flat", "ivf", "hnsw"]), default=None,
              help="Also write a faiss index per code length for CPU search: flat (exact), ivf or hnsw "
                   "(approximate, for archives of ~100M codes and more).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", default=8192, show_default=True, type=int)
@cluster_options
@stage_options
@user_errors
def encode_archive(run_dir, archive, bits, continuous, index, device, batch_size, scheduler, threads, force, wait,
                   no_progress):
    """Stage 3: packed binary codes of every archive item, one file per code length."""
    from duch.pipeline.config import EncodeConfig
    from duch.stages.encode_archive import encode_archive as run_encode

    cfg = EncodeConfig(run=run_dir, archive=archive, bits=bits, continuous=continuous, index=index, device=device,
                       batch_size=batch_size, scheduler=scheduler, threads=threads)
    run_encode(cfg, force=force, progress=not no_progress, echo=click.echo, wait=wait)


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(), help="An encoded run whose archive grows.")
@click.option("--data", required=True, type=click.Path(), help="The new items: the same forms as extract's --data.")
@click.option("--images", type=click.Path(), default=None, help="Images folder, when not beside the annotation.")
@click.option("--replace", is_flag=True,
              help="Items already in the archive whose file changed are coded again (without it they are refused).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Images per batch.")
@click.option("--workers", default=None, type=int, help="Image loading processes [default: spare cores, max 8].")
@cluster_options
@wait_option
@progress_option
@user_errors
def add(run_dir, data, images, replace, device, batch_size, workers, scheduler, threads, wait, no_progress):
    """Add items to an encoded archive: extracted and coded as its own were, published as a new generation."""
    from duch.pipeline.config import AddConfig
    from duch.stages.add import add as run_add

    cfg = AddConfig(run=run_dir, data=data, images=images, replace=replace, device=device, batch_size=batch_size,
                    workers=workers, scheduler=scheduler, threads=threads)
    run_add(cfg, progress=not no_progress, echo=click.echo, wait=wait)


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(), help="An encoded run.")
@click.argument("ids", nargs=-1)
@click.option("--ids", "ids_file", type=click.File("r", encoding="utf-8"), default=None,
              help="A file of image ids, one a line.")
@wait_option
@user_errors
def remove(run_dir, ids, ids_file, wait):
    """Remove items (image ids; their captions go with them) from an encoded archive: a new generation."""
    from duch.pipeline.config import RemoveConfig
    from duch.stages.remove import remove as run_remove

    listed = [line.strip() for line in ids_file] if ids_file else []
    run_remove(RemoveConfig(run=run_dir, ids=tuple(ids) + tuple(i for i in listed if i)), echo=click.echo,
               wait=wait)


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(), help="An encoded run.")
@click.option("--small", default=100_000, show_default=True, type=int,
              help="Segments of fewer items are merged (segments with removed items are always rewritten).")
@wait_option
@user_errors
def compact(run_dir, small, wait):
    """Rewrite an archive's segments without their removed items, merging small ones: a new generation."""
    from duch.pipeline.config import CompactConfig
    from duch.stages.compact import compact as run_compact

    run_compact(CompactConfig(run=run_dir, small=small), echo=click.echo, wait=wait)


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(), help="Run directory with encode-archive codes.")
@click.option("--bits", default=64, show_default=True, type=int, help="Which code length to search.")
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
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--geojson", "as_geojson", is_flag=True,
              help="Print the hits as a GeoJSON FeatureCollection of their footprints (scene tiles).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "faiss", "numpy"]),
              help="CPU scan: faiss IndexBinaryFlat (auto, when installed) or numpy over the memory-mapped codes.")
@click.option("--no-verify", is_flag=True,
              help="Check the code and index files' sizes only, not their SHA-256 against the manifest (hashing "
                   "billions of codes takes minutes).")
@user_errors
def search(run_dir, bits, text, image, item_id, k, modality, rerank, ties, bbox, inside, date_from, date_to, as_json,
           as_geojson, device, backend, no_verify):
    """Search the archive by text, image or item id: top-k by Hamming distance."""
    import json as _json

    from duch.pipeline.retrieval.filters import PlaceFilter, search_places
    from duch.pipeline.retrieval.geojson import geojson
    from duch.pipeline.retrieval.queries import check_query
    from duch.pipeline.retrieval.search import Index

    check_query(text, image, item_id, k, rerank)  # before the archive is opened
    if as_json and as_geojson:
        raise click.UsageError("give one of --json and --geojson")
    places = PlaceFilter.parse(bbox, date_from, date_to, inside)  # checked before the archive is opened
    index = Index.load(run_dir, bits=bits, device=device, backend=backend, verify=not no_verify)
    query = text if text is not None else image if image is not None else f"item {item_id}"
    hits, matched = search_places(index, places, need_places=as_geojson, text=text, image=image, id=item_id, k=k,
                                  modality=modality, rerank_top=rerank, ties=ties)
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


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(), help="Run directory with encode-archive codes.")
@click.option("--bits", default=64, show_default=True, type=int, help="Which code length to search.")
@click.option("--archive", "archives", multiple=True, type=click.Path(),
              help="Also serve this run's archive (encoded with RUN's model: encode-archive --archive); repeatable.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. The service has no authentication: bind others only on a trusted network.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--max-in-flight", default=32, show_default=True, type=int,
              help="Queries running at once; more get a 503 with Retry-After at once.")
@click.option("--timeout", default=10.0, show_default=True, type=float, help="Seconds a query may take (then 503).")
@click.option("--max-upload-mb", default=20.0, show_default=True, type=float, help="Largest request body (413).")
@click.option("--max-batch", default=64, show_default=True, type=int,
              help="Most captions coded in one text-encoder pass (1: no batching).")
@click.option("--max-image-batch", default=1, show_default=True, type=int,
              help="Most uploaded images coded in one image-encoder pass (batches pay on a GPU, not on a CPU).")
@click.option("--threads", default=None, type=int,
              help="Torch threads for coding queries [default: torch's, every core].")
@click.option("--cors", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Let pages from this origin call the API (e.g. https://maps.example.org); off by default.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--no-verify", is_flag=True, help="Check code files' sizes only at start, not their SHA-256.")
@click.option("--basemap", default=None, metavar="URL",
              help="Scene archives' map: an XYZ tile URL template ({z}/{x}/{y}) drawn beneath the footprints, fetched "
                   "by the browser [default: none, the map is drawn offline].")
@click.option("--basemap-attribution", default="", metavar="TEXT", help="Credit shown on the map under the basemap.")
@user_errors
def serve(run_dir, bits, archives, host, port, max_in_flight, timeout, max_upload_mb, max_batch, max_image_batch,
          threads, cors_origins, device, no_verify, basemap, basemap_attribution):
    """Search service and web page over the encoded archive (http://127.0.0.1:8000/, API docs at /docs)."""
    import uvicorn

    from duch.pipeline.config import ServeConfig
    from duch.pipeline.serve.app import create_app

    cfg = ServeConfig(run=run_dir, bits=bits, archives=archives, host=host, port=port, max_in_flight=max_in_flight,
                      timeout=timeout, max_upload_mb=max_upload_mb, max_batch=max_batch,
                      max_image_batch=max_image_batch, threads=threads, cors_origins=cors_origins,
                      device=device, verify=not no_verify, basemap=basemap, basemap_attribution=basemap_attribution)
    cfg.validate()
    if not cfg.loopback():
        click.echo(f"warning: binding {host}: the service is reachable from other machines and has no "
                   "authentication", err=True)
    app = create_app(cfg)
    click.echo(f"serving {', '.join(app.state.service.archives)} ({bits} bits) at http://{host}:{port}/ "
               f"(API docs at /docs); Ctrl-C stops", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(), help="Run directory with encode-archive codes.")
@click.option("--bits", default="", callback=lambda c, p, v: _bits(c, p, v) or None,
              help="Code lengths to evaluate [default: every encoded one].")
@click.option("-k", "--k", default=20, show_default=True, type=int, help="mAP@K.")
@click.option("--rerank", default=100, show_default=True, type=int,
              help="Also rank with this Hamming shortlist re-ranked by the continuous outputs (0: off).")
@wait_option
@user_errors
def evaluate(run_dir, bits, k, rerank, wait):
    """mAP@K, precision curves and instance-level Recall@K on the run's held-out split; plots and metrics.json."""
    from duch.pipeline.config import EvaluateConfig
    from duch.stages.evaluate import evaluate as run_evaluate

    run_evaluate(EvaluateConfig(run=run_dir, bits=bits, k=k, rerank=rerank), echo=click.echo, wait=wait)


if __name__ == "__main__":
    main()

"""duch command line: thin click wrappers over the Python API (`duch.stages.*`, `duch.pipeline.retrieval`)."""
from __future__ import annotations

import dataclasses
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
from duch.pipeline.config import AddConfig, CompactConfig, EncodeConfig, EvaluateConfig, ExtractConfig, ServeConfig
from duch.pipeline.config.train import PAPER_TRAINING, TRAIN_RECIPES, TrainConfig
from duch.pipeline.errors import spelled


def user_errors(fn):
    """A mistake a user can fix is one line on stderr and exit code 2, never a traceback. A full disk or a folder
    without write permission is one of those, wherever the write happened (pipeline.storage words it)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from duch.pipeline.run.storage import storage_error

        try:
            return fn(*args, **kwargs)
        except (DuchError, DatasetError, OSError) as e:
            message = storage_error(e) if isinstance(e, OSError) else e
            if message is None:
                raise
            click.echo(f"error: {spelled(str(message), 'cli')}", err=True)
            sys.exit(2)

    return wrapper


def say(line: str) -> None:  # a stage's progress line, its parameters spelled as options
    click.echo(spelled(line, "cli"))


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


def option(config: type, name: str, *decls: str, **kwargs):
    """The option of `config`'s field `name` (`--name` unless `decls` say otherwise), its default (and so its type)
    read from the dataclass, the one place a default is written: a tuple as the comma list `_ints` parses back;
    shown in --help unless None or empty (the help then says what that means)."""
    default = next(f.default for f in dataclasses.fields(config) if f.name == name)
    default = ",".join(map(str, default)) if isinstance(default, tuple) else default
    kwargs.setdefault("show_default", default not in (None, ""))
    return click.option(*(decls or (f"--{name.replace('_', '-')}",)), default=default, **kwargs)


def _ints(ctx, param, value: str | None, example: str = "16,32,64,128", empty=()) -> tuple[int, ...] | None:
    """A comma list of integers (code lengths unless `example` says otherwise); `empty` when it lists none."""
    try:
        return tuple(int(b) for b in (value or "").split(",") if b.strip()) or empty
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as {example}, got {value!r}") from None


_some_bits = functools.partial(_ints, empty=None)  # none given: every code length the run has


def stacked(*decorators):
    """One decorator of several, applied as if written above a function in this order."""
    return lambda fn: functools.reduce(lambda f, d: d(f), reversed(decorators), fn)


device_option = functools.partial(option, name="device", help="auto, cpu, cuda or cuda:N.")  # device_option(Config)
images_option = click.option("--images", type=click.Path(), help="Images folder, when not beside the annotation.")
wait_option = click.option("--wait", default=0.0, show_default=True, metavar="SECONDS",
                           help="When another duch process holds the run, wait up to this long for it.")
progress_option = click.option("--no-progress", is_flag=True, help="No progress bars.")
# What every stage that keeps its outputs takes.
stage_options = stacked(click.option("--force", is_flag=True,
                                     help="Redo the stage even if it is finished or made from other settings."),
                        wait_option, progress_option)


def cluster_options(config: type):
    """--scheduler and --threads, for the stages that run one task per shard (docs/cluster.md)."""
    return stacked(
        option(config, "scheduler",
               help="Where the per-shard tasks run: none (this process), local[:N] (a dask LocalCluster of N worker "
                    "processes, one per GPU by default) or a running dask scheduler's address, tcp://host:8786 "
                    "(outputs must then be on storage every worker reaches; see docs/cluster.md)."),
        option(config, "threads", type=int,
               help="Torch threads per encoding process [default: all cores; on a local cluster, cores / N]. Runs "
                    "compared bit for bit on CPU use the same count."))


@main.command()
@click.option("--data", required=True, type=click.Path(),
              help="Annotation file (.json caption format, .jsonl or .csv image,caption rows) or a folder "
                   "(holding one annotation file and images/, or only images).")
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
@option(ExtractConfig, "bands", callback=functools.partial(_ints, example="4,3,2"),
        help="Scene bands read as R,G,B, counted from 1 (e.g. 4,3,2 for Sentinel-2), or one for grey "
             "[default: 1,2,3].")
@option(ExtractConfig, "min_valid",
        help="Share of a tile's pixels that must be valid (not nodata); tiles below are skipped and counted.")
@option(ExtractConfig, "date", metavar="YYYY-MM-DD",
        help="Acquisition date of scenes with none in a sidecar or their metadata.")
@click.option("--allow-ungeoreferenced", is_flag=True,
              help="Accept scenes without a CRS: their tiles get footprints in pixels and match no --bbox.")
@cluster_options(ExtractConfig)
@stage_options
@user_errors
def extract(force, wait, no_progress, **settings):
    """Stage 1: cache image and text embeddings (with augmented views) in HDF5 shards."""
    from duch.stages.extract import extract as run_extract

    run_extract(ExtractConfig(**settings), force=force, progress=not no_progress, echo=say, wait=wait)


@main.command("train-hash")
@click.option("--run", required=True, type=click.Path(), help="Run directory with a finished extract.")
@option(TrainConfig, "bits", callback=_ints, help="Code lengths, comma-separated multiples of 8.")
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


@main.command("encode-archive")
@click.option("--run", required=True, type=click.Path(), help="Run directory with a trained train-hash.")
@option(EncodeConfig, "archive", type=click.Path(),
        help="Run directory of another extract run to encode with this model (same encoders); its codes go to "
             "ARCHIVE/encode-archive [default: RUN itself].")
@option(EncodeConfig, "bits", callback=_some_bits, help="Code lengths to encode [default: every trained one].")
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


@main.command()
@click.option("--run", required=True, type=click.Path(), help="An encoded run whose archive grows.")
@click.option("--data", required=True, type=click.Path(), help="The new items: the same forms as extract's --data.")
@images_option
@click.option("--replace", is_flag=True,
              help="Items already in the archive whose file changed are coded again (without it they are refused).")
@device_option(AddConfig)
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


@main.command()
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


@main.command()
@click.option("--run", required=True, type=click.Path(), help="An encoded run.")
@option(CompactConfig, "small",
        help="Segments of fewer items are merged (segments with removed items are always rewritten).")
@wait_option
@user_errors
def compact(wait, **settings):
    """Rewrite an archive's segments without their removed items, merging small ones: a new generation."""
    from duch.stages.compact import compact as run_compact

    run_compact(CompactConfig(**settings), echo=say, wait=wait)


@main.command()
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
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--geojson", "as_geojson", is_flag=True,
              help="Print the hits as a GeoJSON FeatureCollection of their footprints (scene tiles).")
@device_option(ServeConfig)  # a search codes its query as the service does
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
@click.option("--run", required=True, type=click.Path(), help="Run directory with encode-archive codes.")
@option(ServeConfig, "bits", help="Which code length to search.")
@click.option("--archive", "archives", multiple=True, type=click.Path(),
              help="Also serve this run's archive (encoded with RUN's model: encode-archive --archive); repeatable.")
@option(ServeConfig, "host", help="Address to bind (no authentication: bind others only on a trusted network).")
@option(ServeConfig, "port")
@option(ServeConfig, "max_in_flight", help="Queries running at once; more get a 503 with Retry-After at once.")
@option(ServeConfig, "timeout", help="Seconds a query may take (then 503).")
@option(ServeConfig, "max_upload_mb", help="Largest request body (413).")
@option(ServeConfig, "max_json_kb", help="Largest JSON request body (413, unparsed).")
@option(ServeConfig, "header_timeout", help="Seconds a client may take to send a request's headers.")
@option(ServeConfig, "body_timeout", help="Seconds a client may take to send a request's body (408).")
@option(ServeConfig, "max_batch", help="Most captions coded in one text-encoder pass (1: no batching).")
@option(ServeConfig, "max_image_batch", help="Most uploaded images coded in one encoder pass (batches pay on a GPU).")
@option(ServeConfig, "threads", type=int, help="Torch threads for coding queries [default: torch's, every core].")
@click.option("--cors", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Let pages from this origin call the API (e.g. https://maps.example.org); off by default.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME[:PORT]",
              help="Also answer requests for this Host (a reverse proxy's public name); repeatable.")
@device_option(ServeConfig)
@click.option("--no-verify", is_flag=True, help="Check code files' sizes only at start, not their SHA-256.")
@option(ServeConfig, "basemap", metavar="URL",
        help="Scene archives' map: an XYZ tile URL template ({z}/{x}/{y}) drawn beneath the footprints, fetched by "
             "the browser [default: none, the map is drawn offline].")
@option(ServeConfig, "basemap_attribution", metavar="TEXT", help="Credit shown on the map under the basemap.")
@user_errors
def serve(no_verify, **settings):
    """Search service and web page over the encoded archive (http://127.0.0.1:8000/, API docs at /docs)."""
    from duch.pipeline.serve.app import create_app, serve_forever

    cfg = ServeConfig(verify=not no_verify, **settings)
    cfg.validate()
    if not cfg.loopback():
        click.echo(f"warning: binding {cfg.host}: the service is reachable from other machines and has no "
                   "authentication", err=True)
    serve_forever(create_app(cfg), lambda line: click.echo(line, err=True))


@main.command()
@click.option("--run", required=True, type=click.Path(), help="Run directory with encode-archive codes.")
@option(EvaluateConfig, "bits", callback=_some_bits, help="Code lengths to evaluate [default: every encoded one].")
@option(EvaluateConfig, "k", "-k", "--k", help="mAP@K.")
@option(EvaluateConfig, "rerank",
        help="Also rank with this Hamming shortlist re-ranked by the continuous outputs (0: off).")
@stage_options
@user_errors
def evaluate(force, wait, no_progress, **settings):
    """mAP@K, precision curves and instance-level Recall@K on the run's held-out split; plots and metrics.json."""
    from duch.stages.evaluate import evaluate as run_evaluate

    run_evaluate(EvaluateConfig(**settings), force=force, progress=not no_progress, echo=say, wait=wait)


if __name__ == "__main__":
    main()

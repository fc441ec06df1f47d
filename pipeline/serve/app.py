"""The search service: `create_app(ServeConfig(run="runs/ucm"))` returns a FastAPI app (served by `duch serve`
with uvicorn) that loads the codes, heads and query encoders once and answers:

    POST /api/search      a caption, an archive item or an uploaded image -> hits with thumbnails, and timings
    GET  /api/search.geojson  the same (caption or item) as a GeoJSON FeatureCollection of scene tiles' footprints
    GET  /api/items/{id}  an item's label, captions and place   GET /api/info   archives, labels, extents, limits
    GET  /api/scenes      an archive's scene outlines (GeoJSON)  GET /           the search page (and its map)
    GET  /thumbs/{id}     a JPEG thumbnail of an archive image or scene tile
    GET  /healthz, /metrics (Prometheus), /docs (OpenAPI)

No handler blocks the event loop: captions and images are coded on a query coder's thread each (batching),
scans, file reads and the decoding of uploads on a small thread pool; a JSON body is parsed only when it is small
(limits, api). At most `max_in_flight` queries run at once (admission). The Host and Origin rules, body and
header limits: limits.py; a client address whose requests keep being refused is slowed: fairness.py. HEAD is
answered wherever GET is.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI

from duch.pipeline.compute.cluster import torch_threads
from duch.pipeline.config.serve import ServeConfig
from duch.pipeline.retrieval.geojson import geojson
from duch.pipeline.retrieval.places import NO_PLACES
from duch.pipeline.retrieval.queries import Query
from duch.pipeline.retrieval.search import UnknownItem
from duch.pipeline.serve.admission import DEADLINE, Admission
from duch.pipeline.serve.api import ApiError, SearchRequest, Upload
from duch.pipeline.serve.archives import ServedArchive, open_archives
from duch.pipeline.serve.batching import QueryBatcher
from duch.pipeline.serve.fairness import RefusalPenalty
from duch.pipeline.serve.generations import GenerationWatcher, reopened, show_switches
from duch.pipeline.serve.limits import BodyLimit, RequestGuard, server_options
from duch.pipeline.serve.maps import place_json
from duch.pipeline.serve.metrics import MetricsMiddleware, ServiceMetrics
from duch.pipeline.serve.openapi import add_docs, complete_openapi
from duch.pipeline.serve.routes import add_routes
from duch.pipeline.serve.thumbs import Thumbnails

STATIC = resources.files("duch.pipeline.serve") / "static"


@dataclass(frozen=True)
class CodedQuery:
    """A request's query coded: `query` (None for an archive item, looked up when ranked), what it is as the answer
    shows it, the seconds spent coding it, and how many queries were coded in the same pass (0: none needed)."""

    query: Query | None
    shown: dict
    encode_seconds: float = 0.0
    batch: int = 0


class Service:
    """What the handlers share: the archives, the query coder, the admission, the thread pool, the metrics."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.archives = open_archives(config)
        self.default = next(iter(self.archives))
        self.metrics = ServiceMetrics()
        self.thumbs = {name: Thumbnails(Path(a.index.run) / "serve" / "thumbs", config.thumb_size)
                       for name, a in self.archives.items()}
        self.admission = Admission(config.max_in_flight, config.timeout, self.metrics.in_flight.set,
                                   config.per_client)
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="duch-serve")
        self.coders: dict[str, QueryBatcher] = {}
        self.archives[self.default].warm_model()  # the other archives share its model (open_archives)
        for archive in self.archives.values():
            archive.warm()
            self.metrics.generation.labels(archive.name).set(archive.index.generation)
        self.watcher = GenerationWatcher({name: a.index.run for name, a in self.archives.items()}, self.reopen,
                                         self.swap, config.watch_interval)

    def reopen(self, name: str) -> ServedArchive:
        return reopened(self.archives[name], self.archives[self.default].index, self.config.verify)

    def swap(self, name: str, archive: ServedArchive) -> int:
        """Puts `archive` in service in place of its previous generation, which it returns."""
        previous = self.archives[name].index.generation
        self.archives[name] = archive  # one assignment: a request holds the archive it started with
        self.metrics.generation.labels(name).set(archive.index.generation)
        self.metrics.switches.labels(name).inc()
        return previous

    def start(self) -> None:
        self.watcher.start()
        # One coder thread per modality: a caption never waits behind an image's (slower) encoder pass.
        for modality, most in (("text", self.config.max_batch), ("image", self.config.max_image_batch)):
            self.coders[modality] = QueryBatcher(
                most, lambda coder, n, seconds, m=modality: self.metrics.batches.labels(m).observe(n), modality)

    def stop(self) -> None:
        self.watcher.close()
        for coder in self.coders.values():
            coder.close()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def archive(self, name: str | None) -> ServedArchive:
        archive = self.archives.get(name or self.default)
        if archive is None:
            raise ApiError(404, f"no archive {name!r}; this service has {', '.join(self.archives)}")
        return archive

    async def blocking(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def code(self, modality: str, coder, item):
        """(continuous code, seconds waited for it, queries coded in the same pass)."""
        start = time.perf_counter()
        code, batch = await asyncio.wrap_future(self.coders[modality].submit(coder, item, DEADLINE.get()))
        return code, time.perf_counter() - start, batch

    async def coded(self, archive: ServedArchive, req: SearchRequest, upload: Upload | None) -> CodedQuery:
        """The request's caption or uploaded image coded on its modality's coder thread; an id as it is."""
        coder = archive.index.coder
        if req.text is not None:
            h, encode, batch = await self.code("text", coder.embed_text, req.text)
            return CodedQuery(Query.of("text", h), {"kind": "text", "text": req.text}, encode, batch)
        if upload is not None:
            # Decoded, and its views made, on the request threads (in parallel); the coder thread runs the encoder.
            pixels = await self.blocking(lambda: coder.image_pixels(_stem(upload.name), _decode_upload(upload)))
            h, encode, batch = await self.code("image", coder.embed_pixels, pixels)
            return CodedQuery(Query.of("image", h), {"kind": "image", "image": upload.name}, encode, batch)
        if req.id is not None:
            return CodedQuery(None, {"kind": "id", "id": req.id})
        return CodedQuery(None, {"kind": "examples"})  # marked images alone (api.one_query let it through)

    async def search(self, archive: ServedArchive, req: SearchRequest, upload: Upload | None,
                     arrived: float) -> dict:
        coded = await self.coded(archive, req, upload)
        feedback = req.feedback()
        if feedback.active:
            coded.shown.update(positives=list(feedback.positives), negatives=list(feedback.negatives),
                               rocchio=list(feedback.weights), exclude_marked=feedback.exclude_marked,
                               rule="continuous" if archive.index.tables["image"].continuous is not None else "codes")
        scanned = time.perf_counter()
        target, matched, hits = await self.blocking(self.page, archive, req, coded.query, self.hit)
        done = time.perf_counter()
        self.metrics.queries.labels(coded.shown["kind"]).observe(done - arrived)
        places = req.places()
        return {"query": coded.shown, "archive": archive.name, "generation": archive.index.generation,
                "bits": archive.index.bits, "modality": target, "k": req.k, "offset": req.offset, "matched": matched,
                "filter": {"label": req.label, "bbox": list(places.bbox) if places.bbox else None,
                           "inside": places.inside, "date_from": places.date_from, "date_to": places.date_to,
                           "near": list(places.near) if places.near else None},
                "hits": hits,
                "timings": {"encode_ms": 1000 * coded.encode_seconds, "scan_ms": 1000 * (done - scanned),
                            "total_ms": 1000 * (done - arrived), "batch": coded.batch}}

    async def features(self, archive: ServedArchive, req: SearchRequest, arrived: float) -> dict:
        """The hits as a GeoJSON FeatureCollection of their footprints (retrieval.geojson), each with its
        thumbnail's URL and its file named as the archive names it (never the service's own path)."""
        if not archive.map.has_places:
            raise ApiError(422, f"GeoJSON draws scene tiles' footprints, and {NO_PLACES}")
        if req.modality == "text":
            raise ApiError(422, "modality: GeoJSON draws scene tiles, which are images; leave modality out")
        req = req.model_copy(update={"modality": "image"})
        coded = await self.coded(archive, req, None)
        _, matched, hits = await self.blocking(self.page, archive, req, coded.query, lambda _archive, h: h)
        doc = geojson(hits, matched, req.text if req.text is not None else f"item {req.id}" if req.id is not None
                      else "marked examples")
        paths = archive.index.tables["image"].meta["path"]
        for feature, h in zip(doc["features"], hits):
            feature["properties"].update(path=str(paths[h.row]), thumbnail=self.thumb_url(archive, h.image_id))
        self.metrics.queries.labels(coded.shown["kind"]).observe(time.perf_counter() - arrived)
        return doc

    def page(self, archive: ServedArchive, req: SearchRequest, query: Query | None,
             shape) -> tuple[str, int, list]:
        """The hits offset .. offset + k of a query (rankings are deterministic: the first offset + k, then a
        slice), each as `shape(archive, hit)` makes it; the label and place filters apply before the top k. An id
        not in the archive is an UnknownItem (answered 404)."""
        index = archive.index
        if query is None and req.id is not None:
            query = index.id_query(req.id)
        target = index.target(query, req.modality)
        if target not in index.tables:
            raise ApiError(422, f"modality: archive {archive.name!r} holds no {target} codes")
        where = archive.where(target, req.label, req.places())
        feedback = req.feedback()
        if feedback.active:  # the query refined by the marked images (retrieval/refine.py)
            query, where = refined(self.archives, archive, query, feedback, target, where)
        matched = int(where.sum()) if where is not None else archive.count(target)
        hits = index.rank(query, k=req.offset + req.k, modality=target, rerank_top=req.rerank, ties=req.ties,
                          where=where)[req.offset:]
        return target, matched, [shape(archive, h) for h in hits]

    def hit(self, archive: ServedArchive, h) -> dict:
        captions = [h.caption] if h.caption is not None else [t for _, t in archive.captions_of(h.image_id)]
        return {"rank": h.rank, "id": h.id, "image_id": h.image_id, "modality": h.modality, "distance": h.distance,
                "score": h.score, "label": h.label, "caption": captions[0] if captions else None,
                "captions": captions, "thumbnail": self.thumb_url(archive, h.image_id), "place": place_json(h.place)}

    def thumb_url(self, archive: ServedArchive, image_id: str) -> str:
        url = f"/thumbs/{quote(image_id, safe='')}"
        return url if archive.name == self.default else f"{url}?archive={quote(archive.name, safe='')}"


def refined(archives: dict, archive: ServedArchive, query: Query | None, feedback, target: str, where):
    """(the query refined by `feedback`, `where` without the marked images when asked). Ids that are not this
    archive's images: one UnknownItem (404) naming them, and the other archives served that hold them."""
    index = archive.index
    try:
        return index.refine(query, feedback), index.unmarked(target, feedback, where)
    except UnknownItem as e:
        elsewhere = [name for name, other in archives.items() if other is not archive
                     and any(i in other.index.tables["image"].row_of for i in feedback.marked)]
        hint = f"; archive {' and '.join(map(repr, elsewhere))} holds some of them (send archive)" if elsewhere else ""
        raise UnknownItem(f"{e}{hint}") from None


def _decode_upload(upload: Upload):
    from duch.data.images import ImageLoadError, load_image_bytes

    try:
        return load_image_bytes(upload.data)
    except ImageLoadError as e:
        raise ApiError(400, f"uploaded file {upload.name!r}: {e}") from None


def _stem(name: str) -> str:
    """An upload's name stem, which seeds its augmented views as a file's does (QueryCoder.embed_images); only a
    string, never a path."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def create_app(config: ServeConfig) -> FastAPI:
    """The service over `config.run` (and `config.archives`): loads and warms everything before returning, so a
    mistake (no encoded archive, another model) is a DuchError here, before any port is bound."""
    config.validate()
    service = Service(config)

    @asynccontextmanager
    async def lifespan(_app):
        with torch_threads(config.threads):  # for as long as it serves; the process's own count after
            service.start()
            try:
                yield
            finally:
                service.stop()

    app = FastAPI(title="duch search", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Cross-modal search (caption <-> image) over an archive's binary hash codes.")
    app.state.service = service
    add_routes(app, service, STATIC)
    add_docs(app)  # Swagger UI from the service's own files: /docs works offline
    complete_openapi(app)
    app.add_middleware(BodyLimit, limit=config.max_upload_bytes, seconds=config.body_timeout,
                       json_limit=config.max_json_bytes)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["content-type"])
    app.add_middleware(RequestGuard, config=config)  # outside CORS: a refused request gets no CORS headers
    app.add_middleware(RefusalPenalty, burst=config.refusal_burst, rate=config.refusal_rate,  # sees every refusal
                       on_wait=service.metrics.held.inc, on_turned_away=service.metrics.turned_away.inc)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)
    app.add_middleware(HeadAsGet)
    return app


def serve_forever(app: FastAPI, echo=print) -> None:
    """Serves `app` (create_app's) with uvicorn at its config's host and port until stopped (Ctrl-C), its header
    deadline and keep-alive limit set (limits.server_options), its generation switches logged on stderr."""
    import uvicorn

    config: ServeConfig = app.state.service.config
    echo(f"serving {', '.join(app.state.service.archives)} ({config.bits} bits) at http://{config.host}:"
         f"{config.port}/ (API docs at /docs); Ctrl-C stops")
    show_switches()
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False,
                **server_options(config))


class HeadAsGet:
    """ASGI middleware: HEAD answered wherever GET is (the page, thumbnails, /healthz, static files), as GET's
    answer without its body (FastAPI's routes take GET only)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)

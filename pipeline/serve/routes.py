"""The service's routes and error answers (app.py builds the Service they share). Every error is JSON,
`{"error": "one line naming the field or item, what is wrong and what to send", "status": N}`."""
from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from duch.pipeline import DuchError
from duch.pipeline.config.serve import MOST_DEPTH, MOST_K
from duch.pipeline.errors import spelled
from duch.pipeline.retrieval.search import UnknownItem
from duch.pipeline.serve.admission import Overloaded
from duch.pipeline.serve.api import ApiError, SearchResponse, read_query, read_search
from duch.pipeline.serve.changes import add_changes_routes
from duch.pipeline.serve.limits import BodyTimeout, BodyTooLarge
from duch.pipeline.serve.openapi import (
    FOREIGN_ORIGIN,
    GEOJSON_QUERY,
    OVERLOADED,
    SEARCH_BODY,
    SLOW_BODY,
    UNKNOWN_ARCHIVE,
    GeoJSONResponse,
    HealthOut,
    InfoOut,
    ItemOut,
    errors,
    geojson_ok,
)
from duch.pipeline.serve.thumbs import NoThumbnail


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def client(request: Request) -> str:
    """The address a request came from (uvicorn's peer; behind a local proxy, X-Forwarded-For's)."""
    return request.client.host if request.client else ""


def add_routes(app: FastAPI, service, static) -> None:
    """The routes over `service` (app.Service); `static`: the page's folder."""
    add_error_handlers(app, service)
    add_api_routes(app, service)
    add_changes_routes(app, service)
    add_page_routes(app, service, static)


def add_error_handlers(app: FastAPI, service) -> None:
    """Every error as one JSON line ({"error": ...}) with its status; overload counted in the metrics."""
    @app.exception_handler(ApiError)
    async def api_error(_request, e: ApiError):
        return error(e.status, e.message, e.headers)

    @app.exception_handler(Overloaded)
    async def overloaded(_request, e: Overloaded):
        service.metrics.refused.labels(e.reason).inc()
        return error(503, str(e), {"Retry-After": str(e.retry_after)})

    @app.exception_handler(BodyTooLarge)
    async def too_large(_request, e: BodyTooLarge):
        return error(413, spelled(str(e), "api"), {"Connection": "close"})

    @app.exception_handler(BodyTimeout)
    async def too_slow(_request, e: BodyTimeout):
        return error(408, spelled(str(e), "api"), {"Connection": "close"})

    @app.exception_handler(UnknownItem)
    async def unknown_item(_request, e: UnknownItem):
        return error(404, spelled(str(e), "api"))

    @app.exception_handler(DuchError)
    async def duch_error(_request, e: DuchError):
        return error(422, spelled(str(e), "api"))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, e: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in x['loc'][1:]) or 'request'}: {x['msg']}" for x in e.errors()]
        return error(422, "; ".join(parts))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        message = {404: "no such page; the API is under /api (see /docs)", 405: "method not allowed here"}
        headers = e.headers
        if e.status_code == 405:  # Allow: the methods of every route at this path (Starlette names the first's)
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(app, request.url.path))}
        return error(e.status_code, str(e.detail) if e.status_code not in message else message[e.status_code],
                     headers)


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods the routes at `path` answer (GET and POST /api/changes are two routes)."""
    return sorted({m for r in app.routes if isinstance(r, APIRoute) and r.path_regex.match(path) for m in r.methods})


def add_api_routes(app: FastAPI, service) -> None:
    """The JSON API under /api: search (also as GeoJSON), scenes, items, info."""
    @app.post("/api/search", response_model=SearchResponse, openapi_extra=SEARCH_BODY,
              summary="Search by a caption, an archive item or an uploaded image",
              responses=errors(e400="malformed JSON, or an upload that is not an image or is too large in pixels",
                               e403=FOREIGN_ORIGIN, e404="unknown id or archive", e408=SLOW_BODY,
                               e413="request body over the upload limit, or a JSON body over --max-json-kb",
                               e415="a body that is neither JSON nor a multipart form",
                               e422="no query, two at once, or a field out of range", e503=OVERLOADED))
    async def search(request: Request):
        arrived = time.perf_counter()
        req, upload = await read_search(request)
        archive = service.archive(req.archive)
        return await service.admission.run(lambda: service.search(archive, req, upload, arrived), client(request))

    @app.get("/api/search.geojson", summary="A caption or item search's hits as a GeoJSON FeatureCollection of "
                                            "scene tiles' footprints", response_class=GeoJSONResponse,
             openapi_extra=GEOJSON_QUERY,
             responses={**geojson_ok("the hits' footprints, with their rank, distance, thumbnail..."),
                        **errors(e404="unknown id or archive", e422="no query, an archive without places, or a "
                                                                    "field out of range", e503=OVERLOADED)})
    async def search_geojson(request: Request):
        """The fields of POST /api/search as query parameters (text or id, k, offset, bbox, inside, date_from,
        date_to, label, rerank, ties, archive): a FeatureCollection (RFC 7946) of the hits' lon/lat footprints
        with rank, distance, score, id, scene, window, date, crs, footprint, path and thumbnail."""
        arrived = time.perf_counter()
        req = read_query(request.query_params)
        archive = service.archive(req.archive)
        doc = await service.admission.run(lambda: service.features(archive, req, arrived), client(request))
        return JSONResponse(doc, media_type="application/geo+json")

    @app.get("/api/scenes", summary="The scenes of an archive of scene tiles: their outlines as GeoJSON",
             response_class=GeoJSONResponse,
             responses={**geojson_ok("each scene's outline (null geometry without lon/lat), name, tiles and dates"),
                        **errors(e404=UNKNOWN_ARCHIVE)})
    async def scenes(archive: str | None = None):
        found = service.archive(archive)
        return JSONResponse(await service.blocking(lambda: found.map.scenes), media_type="application/geo+json")

    @app.get("/api/items/{item_id:path}", summary="An archive item's label, captions and place (a scene tile's)",
             responses={200: {"model": ItemOut}, **errors(e404="unknown id or archive")})
    async def item(item_id: str, archive: str | None = None):
        found = service.archive(archive)
        out = await service.blocking(found.item, item_id)  # an unknown id: UnknownItem, answered 404
        return {**out, "archive": found.name, "thumbnail": service.thumb_url(found, out["image_id"])}

    @app.get("/api/info", summary="The archives served, their sizes, labels and places, the basemap, the limits",
             responses={200: {"model": InfoOut}})
    async def info():
        config = service.config
        return {"default": service.default, "bits": config.bits,
                "archives": [{"name": a.name, "generation": a.index.generation, "images": a.count("image"),
                              "captions": a.count("text"), "modalities": a.modalities, "labels": a.labels,
                              **a.map.info()} for a in service.archives.values()],
                "basemap": {"url": config.basemap, "attribution": config.basemap_attribution} if config.basemap
                else None,
                "limits": {"most_k": MOST_K, "most_depth": MOST_DEPTH,
                           "max_upload_mb": service.config.max_upload_mb,
                           "max_in_flight": service.config.max_in_flight, "timeout_s": service.config.timeout}}


def add_page_routes(app: FastAPI, service, static) -> None:
    """Thumbnails, health, metrics, and the page with its static assets."""
    @app.get("/thumbs/{item_id:path}", summary="A JPEG thumbnail of an archive image (a caption's: its image's; a "
                                                "scene tile's: rendered from its scene window)",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}},
                                                 **errors(e404="unknown id or archive, or an unreadable image")})
    async def thumb(item_id: str, archive: str | None = None):
        found = service.archive(archive)
        try:
            path = found.image_file(item_id)  # from the archive's own metadata, never from the request
            data = await service.blocking(service.thumbs[found.name].get, path, found.place(item_id))
        except NoThumbnail as e:
            raise ApiError(404, f"no thumbnail for {item_id!r}: {e}") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/healthz", summary="Liveness: the archives are loaded", responses={200: {"model": HealthOut}})
    async def healthz():
        return {"status": "ok", "archives": list(service.archives), "in_flight": service.admission.in_flight}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})
    async def metrics():
        body, kind = service.metrics.render()
        return Response(body, media_type=kind)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(static / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

"""The change routes: GET or POST /api/changes (the pairs of tiles of two dates, most changed first, with both
thumbnails) and GET /api/changes.geojson (the same pairs as GeoJSON), over retrieval/changes.py, under the admission
control of every query (at most max_in_flight at once, each within the timeout). Fields: from, to (YYYY-MM-DD), k,
offset, bbox, inside, min_iou, rerank, archive; as query parameters (GET) or a JSON object (POST)."""
from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from duch.pipeline import DuchError
from duch.pipeline.config.serve import MOST_DEPTH, MOST_K
from duch.pipeline.errors import spelled
from duch.pipeline.retrieval.changes import changes_geojson, find_changes
from duch.pipeline.retrieval.filters import PlaceFilter
from duch.pipeline.retrieval.overlap import MIN_IOU
from duch.pipeline.serve.api import ApiError, PlaceOut, parse_json
from duch.pipeline.serve.maps import place_json
from duch.pipeline.serve.openapi import FOREIGN_ORIGIN, OVERLOADED, SLOW_BODY, GeoJSONResponse, errors

MOST_UNPAIRED_IDS = 1000  # unpaired ids listed a date in an answer (their count is always whole)


class ChangesRequest(BaseModel):
    """Two dates of a scene archive whose tiles are paired by footprint, and which pairs to return."""

    model_config = ConfigDict(extra="forbid")
    from_date: str = Field(alias="from", min_length=1, max_length=40,
                           description="the first date, YYYY-MM-DD: its tiles are paired with the second date's")
    to_date: str = Field(alias="to", min_length=1, max_length=40, description="the second date, YYYY-MM-DD")
    k: int = Field(20, ge=1, le=MOST_K, description="pairs to return, most changed first")
    offset: int = Field(0, ge=0, description=f"pairs to skip (paging); offset + k is at most {MOST_DEPTH}")
    bbox: str | list[float] | None = Field(
        None, description="a lon/lat box MINLON,MINLAT,MAXLON,MAXLAT (or 4 numbers): pairs with a tile whose "
                          "footprint overlaps it (lies inside it, with `inside`)")
    inside: bool = Field(False, description="with bbox: a tile must lie wholly inside the box")
    min_iou: float = Field(MIN_IOU, gt=0, le=1, description="tiles of different grids pair when the intersection "
                                                            "over union of their footprints is at least this")
    rerank: bool = Field(False, description="order the pairs by the cosine of their continuous outputs instead of "
                                            "their Hamming distance (the archive must store them)")
    archive: str | None = Field(None, description="which archive; default: the run's own")

    @model_validator(mode="after")
    def _depth(self):
        if self.offset + self.k > MOST_DEPTH:
            raise ValueError(f"offset + k must be at most {MOST_DEPTH}, got {self.offset + self.k}")
        return self

    def places(self) -> PlaceFilter:
        try:
            return PlaceFilter.parse(self.bbox, inside=self.inside)
        except DuchError as e:
            raise ApiError(422, spelled(str(e), "api")) from None


class TileOut(BaseModel):
    id: str
    label: str | None
    thumbnail: str = Field(description="URL of the tile's thumbnail")
    place: PlaceOut | None


class PairOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    rank: int
    distance: int = Field(description="Hamming distance between the two tiles' codes")
    score: float | None = Field(description="cosine of the two tiles' continuous outputs (null: not stored)")
    iou: float = Field(description="intersection over union of the two footprints (1 on the same grid)")
    before: TileOut = Field(alias="from", description="the tile of the first date")
    after: TileOut = Field(alias="to", description="the tile of the second date")


class UnpairedOut(BaseModel):
    count: int
    ids: list[str] = Field(description=f"the first {MOST_UNPAIRED_IDS} of them")


class ChangesOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    archive: str
    generation: int
    bits: int
    from_date: str = Field(alias="from")
    to_date: str = Field(alias="to")
    k: int
    offset: int
    matched: int = Field(description="pairs the filter lets through")
    tiles: dict[str, int] = Field(description="tiles of each date (from, to) the filter lets through")
    unpaired: dict[str, UnpairedOut] = Field(description="tiles of each date (from, to) with no partner")
    reranked: bool
    pairs: list[PairOut]
    total_ms: float


class ChangeFeatureOut(BaseModel):
    type: str = Field(pattern="^Feature$")
    id: str = Field(description="FROM_ID|TO_ID")
    geometry: dict | None
    bbox: list[float] | None = None
    properties: dict


class ChangeCollectionOut(BaseModel):
    type: str = Field(pattern="^FeatureCollection$")
    features: list[ChangeFeatureOut]
    from_date: str = Field(alias="from")
    to_date: str = Field(alias="to")
    matched: int
    tiles: dict[str, int]
    unpaired: dict[str, UnpairedOut]


def one_line(error: ValidationError) -> str:
    parts = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "body"
        message = e["msg"].removeprefix("Value error, ")
        fields = ", ".join(f.alias or name for name, f in ChangesRequest.model_fields.items())
        parts.append(f"{where}: {message}" if e["type"] != "extra_forbidden" else
                     f"{where}: unknown field (send {fields})")
    return "; ".join(parts)


def read_changes(fields) -> ChangesRequest:
    if not isinstance(fields, dict):
        raise ApiError(422, "the JSON body must be an object such as {\"from\": \"2021-06-03\", \"to\": "
                            "\"2022-06-03\"}")
    try:
        req = ChangesRequest.model_validate(fields)
    except ValidationError as e:
        raise ApiError(422, one_line(e)) from None
    req.places()  # a bad box is answered before the request is admitted
    return req


def request_schema() -> dict:
    return ChangesRequest.model_json_schema(by_alias=True)


def query_parameters() -> list[dict]:
    """ChangesRequest's fields as query parameters (bbox as MINLON,MINLAT,MAXLON,MAXLAT)."""
    schema = request_schema()
    out = []
    for name, field in schema["properties"].items():
        kind = {k: v for k, v in field.items() if k not in ("title", "description", "default")}
        if "anyOf" in kind:  # optional: null is the parameter left out
            kinds = [s for s in kind.pop("anyOf") if s.get("type") != "null"]
            kind.update(kinds[0] if len(kinds) == 1 else {"type": "string"})
        out.append({"name": name, "in": "query", "required": name in schema.get("required", []), "schema": kind,
                    "description": field.get("description", "")})
    return out


def tile(service, archive, hit) -> dict:
    return {"id": hit.id, "label": hit.label, "thumbnail": service.thumb_url(archive, hit.image_id),
            "place": place_json(hit.place)}


def answer(service, archive, req: ChangesRequest, arrived: float) -> dict:
    """The pairs as the API answers them (on the service's thread pool)."""
    found = find_changes(archive.index, req.from_date, req.to_date, k=req.k, places=req.places(),
                         rerank=req.rerank, min_iou=req.min_iou, offset=req.offset)
    doc = found.to_dict(MOST_UNPAIRED_IDS)
    pairs = [{"rank": p.rank, "distance": p.distance, "score": p.score, "iou": p.iou,
              "from": tile(service, archive, p.before), "to": tile(service, archive, p.after)} for p in found.pairs]
    return {"archive": archive.name, "generation": archive.index.generation, "bits": archive.index.bits,
            "from": found.from_date, "to": found.to_date, "k": req.k, "offset": req.offset, "matched": found.matched,
            "tiles": found.tiles, "unpaired": doc["unpaired"], "reranked": found.reranked, "pairs": pairs,
            "total_ms": 1000 * (time.perf_counter() - arrived)}


def features(service, archive, req: ChangesRequest) -> dict:
    found = find_changes(archive.index, req.from_date, req.to_date, k=req.k, places=req.places(),
                         rerank=req.rerank, min_iou=req.min_iou, offset=req.offset)
    doc = changes_geojson(found, MOST_UNPAIRED_IDS)
    for feature, p in zip(doc["features"], found.pairs):
        feature["properties"].update(from_thumbnail=service.thumb_url(archive, p.before.image_id),
                                     to_thumbnail=service.thumb_url(archive, p.after.image_id))
    return doc


CHANGES_ERRORS = dict(e404="unknown archive", e422="a field out of range, two equal dates, a date without tiles, or "
                                                   "an archive without places", e503=OVERLOADED)


def add_changes_routes(app: FastAPI, service) -> None:
    """GET and POST /api/changes, GET /api/changes.geojson."""
    async def run(req: ChangesRequest, arrived: float, work) -> JSONResponse:
        archive = service.archive(req.archive)

        async def admitted():
            out = await service.blocking(work, service, archive, req)
            service.metrics.queries.labels("changes").observe(time.perf_counter() - arrived)
            return out

        return await service.admission.run(admitted)

    summary = "The pairs of tiles of two dates, most changed first, with both thumbnails"

    @app.get("/api/changes", summary=summary, openapi_extra={"parameters": query_parameters()},
             responses={200: {"model": ChangesOut}, **errors(**CHANGES_ERRORS)})
    async def changes_get(request: Request):
        """Tiles of `from` paired with tiles of `to` by footprint (the same window on the same grid; else the
        largest overlap, IoU at least min_iou), ranked by the Hamming distance of their codes; the tiles left
        without a partner counted and listed."""
        arrived = time.perf_counter()
        req = read_changes(dict(request.query_params))
        return await run(req, arrived, lambda s, a, r: answer(s, a, r, arrived))

    @app.post("/api/changes", summary=summary, responses={
        200: {"model": ChangesOut},
        **errors(e400="malformed JSON", e403=FOREIGN_ORIGIN, e408=SLOW_BODY, e413="a JSON body over --max-json-kb",
                 e415="a body that is not JSON", **CHANGES_ERRORS)},
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": request_schema()}}}})
    async def changes_post(request: Request):
        """The fields of GET /api/changes as a JSON object."""
        arrived = time.perf_counter()
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, "send the request as JSON (application/json)")
        req = read_changes(parse_json(await request.body()))
        return await run(req, arrived, lambda s, a, r: answer(s, a, r, arrived))

    @app.get("/api/changes.geojson", summary="The pairs of tiles of two dates as a GeoJSON FeatureCollection of "
                                             "their footprints", response_class=GeoJSONResponse,
             openapi_extra={"parameters": query_parameters()},
             responses={200: {"model": ChangeCollectionOut, "description": "each pair's first-date footprint, with "
                                                                           "both ids, dates and thumbnails"},
                        **errors(**CHANGES_ERRORS)})
    async def changes_geojson_route(request: Request):
        """The fields of GET /api/changes; each pair a Feature (its first date's footprint) with rank, distance,
        score, iou, from_id, to_id, both dates, scenes, windows and thumbnails."""
        arrived = time.perf_counter()
        req = read_changes(dict(request.query_params))
        doc = await run(req, arrived, features)
        return JSONResponse(doc, media_type="application/geo+json")

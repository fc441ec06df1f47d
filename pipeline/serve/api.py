"""The JSON API's shapes (pydantic models, which /docs shows) and the reading of a search request: a JSON body, or
a multipart form with an uploaded image. Every mistake is an ApiError: a status and one line naming the field,
what is wrong and what to send instead."""
from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.requests import Request

from duch.pipeline import DuchError
from duch.pipeline.config.serve import MOST_DEPTH, MOST_K
from duch.pipeline.errors import spelled
from duch.pipeline.retrieval.filters import PlaceFilter
from duch.pipeline.retrieval.queries import check_query
from duch.pipeline.retrieval.refine import MOST_EXAMPLES, Feedback

FORM_FIELDS = ("text", "id", "k", "offset", "modality", "rerank", "ties", "label", "bbox", "inside", "date_from",
               "date_to", "archive", "positives", "negatives", "exclude_marked", "rocchio", "near")


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class SearchRequest(BaseModel):
    """One query: a caption (`text`) or an archive item (`id`); an image is sent as a multipart upload instead."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, min_length=1, max_length=2000, description="a caption to search by")
    id: str | None = Field(None, min_length=1, max_length=500,
                           description="an archive item: an image id, or IMAGE_ID#N for its N-th caption")
    k: int = Field(20, ge=1, le=MOST_K, description="hits to return")
    offset: int = Field(0, ge=0, description=f"hits to skip (paging); offset + k is at most {MOST_DEPTH}")
    modality: Literal["image", "text"] | None = Field(
        None, description="what to return; default: the other modality than the query's")
    rerank: int = Field(0, ge=0, le=2000, description="re-rank this many Hamming neighbours by cosine (0: off)")
    ties: Literal["adaptive", "order"] = "adaptive"
    label: str | None = Field(None, description="return only items of this class, filtered before the top k")
    bbox: str | list[float] | None = Field(
        None, description="scene tiles only: a lon/lat box MINLON,MINLAT,MAXLON,MAXLAT (or 4 numbers); tiles whose "
                          "footprint overlaps it (lies inside it, with `inside`), filtered before the top k")
    inside: bool = Field(False, description="with bbox: only tiles whose footprint lies wholly inside the box")
    date_from: str | None = Field(None, description="scene tiles only: acquired on or after YYYY-MM-DD")
    date_to: str | None = Field(None, description="scene tiles only: acquired on or before YYYY-MM-DD")
    archive: str | None = Field(None, description="which archive; default: the run's own")
    positives: str | list[str] | None = Field(
        None, description="archive image ids marked right (a list, or a comma list): refine the query with them, or "
                    "search by them alone (Rocchio in the heads' continuous space)")
    negatives: str | list[str] | None = Field(
        None, description=f"archive image ids marked wrong (a list, or a comma list); at most {MOST_EXAMPLES} "
                          "examples in all")
    exclude_marked: bool = Field(False, description="leave the positives and negatives out of the results")
    rocchio: str | list[float] | None = Field(
        None, description="the weights ALPHA,BETA,GAMMA of the query, the positives and the negatives "
                          "(default 1,1,0.25)")
    near: str | list[float] | None = Field(
        None, description="scene tiles only: LON,LAT,METRES (or 3 numbers); tiles whose footprint lies within that "
                          "great-circle distance of the point (0: the tiles that contain it), filtered before the "
                          "top k")

    @model_validator(mode="after")
    def _depth(self):
        if self.offset + self.k > MOST_DEPTH:
            raise ValueError(f"offset + k must be at most {MOST_DEPTH}, got {self.offset + self.k}")
        return self

    def places(self) -> PlaceFilter:
        """The place filter (bbox, inside, dates), or an ApiError naming the field and the fix."""
        try:
            return PlaceFilter.parse(self.bbox, self.date_from, self.date_to, self.inside, self.near)
        except DuchError as e:
            raise ApiError(422, spelled(str(e), "api")) from None

    def feedback(self) -> Feedback:
        """The marked examples (positives, negatives, exclude_marked, rocchio), or an ApiError naming the field."""
        try:
            return Feedback.parse(self.positives, self.negatives, _weights(self.rocchio), self.exclude_marked)
        except DuchError as e:
            raise ApiError(422, spelled(str(e), "api")) from None


def _weights(value):
    """rocchio as a comma list or three numbers -> numbers (Feedback.parse checks them), or the 422."""
    if value is None or not isinstance(value, str):
        return value
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise ApiError(422, f"rocchio {value!r}: give three weights ALPHA,BETA,GAMMA, each 0 or more") from None


class PlaceOut(BaseModel):
    """A scene tile's place as the API answers it (retrieval.places.Place)."""

    scene: str
    window: list[int] = Field(description="the tile's pixels in its scene: col_off, row_off, width, height")
    crs: str = Field(description="the scene's CRS ('' when it has none: the footprint is then in pixels)")
    footprint: list[list[float]] = Field(description="corners upper-left, upper-right, lower-right, lower-left in "
                                                     "the CRS")
    lonlat: list[list[float]] | None = Field(description="the same corners in WGS84 lon/lat")
    bounds: list[float] | None = Field(description="min lon, min lat, max lon, max lat")
    date: str | None = Field(description="acquisition date, YYYY-MM-DD")
    bands: list[int]
    stretch: list[float] | None = Field(description="the scene's >8-bit stretch (low, high), as extract read it")


class HitOut(BaseModel):
    """A hit as the API answers it (retrieval.hits.Hit, with its captions and thumbnail)."""

    rank: int
    id: str = Field(description="image id, or IMAGE_ID#N for a caption")
    image_id: str
    modality: Literal["image", "text"]
    distance: int = Field(description="Hamming distance to the query's code")
    score: float | None = Field(description="cosine when re-ranked; else the query's confidence on the "
                                            "differing bits (adaptive ties), lower first")
    label: str | None
    caption: str | None = Field(description="a caption hit's text; an image hit's first caption")
    captions: list[str] = Field(description="a caption hit's text; an image hit's captions")
    thumbnail: str = Field(description="URL of the image's thumbnail (a caption's: its image's)")
    place: PlaceOut | None = Field(None, description="a scene tile's place (null for other archives' images)")


class Timings(BaseModel):
    encode_ms: float = Field(description="coding the query: waiting for the query coder and its pass")
    scan_ms: float = Field(description="Hamming scan, ties, rerank and the page's metadata")
    total_ms: float = Field(description="from the request's arrival to its answer")
    batch: int = Field(description="queries coded in the same encoder pass (0: none needed)")


class SearchResponse(BaseModel):
    query: dict = Field(description="the query as understood: kind (text, image, id or examples) and text / id / "
                                    "image file name; with marked examples: positives, negatives, rocchio, rule")
    archive: str
    generation: int = Field(description="the archive's generation the answer comes from (duch add, remove, compact)")
    bits: int
    modality: Literal["image", "text"]
    k: int
    offset: int
    matched: int = Field(description="items of the returned modality that the filters let through (all without one)")
    filter: dict = Field(description="the filters as applied: label, bbox (four numbers), inside, date_from, date_to, "
                                     "near (lon, lat, metres)")
    hits: list[HitOut]
    timings: Timings


class Upload(BaseModel):
    name: str
    data: bytes


def one_query(query: SearchRequest, upload: Upload | None, kinds: tuple[str, ...] = ("text", "image", "id")) -> None:
    """Exactly one query (retrieval.queries.check_query, the one check the CLI and the library make), or the 422
    naming the fields."""
    try:
        check_query(query.text, upload, query.id, query.k, query.rerank, kinds,
                    feedback=query.feedback().active)
    except DuchError as e:
        raise ApiError(422, spelled(str(e), "api")) from None


def one_line(error: ValidationError) -> str:
    """Pydantic's errors as one line: `field: message; ...`."""
    parts = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "body"
        message = e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if e["type"] != "extra_forbidden" else
                     f"{where}: unknown field (send {', '.join(FORM_FIELDS)}; an image as a multipart upload)")
    return "; ".join(parts)


async def read_search(request: Request) -> tuple[SearchRequest, Upload | None]:
    """A search request from a JSON body (bounded small by limits.BodyLimit) or a multipart form (fields as in
    JSON, the image as file field `image`)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    upload = None
    if kind == "application/json":
        fields = parse_json(await request.body())
        if not isinstance(fields, dict):
            raise ApiError(422, "the JSON body must be an object such as {\"text\": \"a harbor\", \"k\": 20}")
    elif kind == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=len(FORM_FIELDS) + 1)
        fields = {}
        for key, value in form.multi_items():
            if key == "image" and not isinstance(value, str):
                upload = Upload(name=value.filename or "upload", data=await value.read())
            elif isinstance(value, str):
                fields[key] = value
            else:
                raise ApiError(422, f"file field {key!r}: send the image as the field 'image'")
    else:
        raise ApiError(415, "send the query as JSON (application/json) or, with an image, as multipart/form-data")
    try:
        query = SearchRequest.model_validate(fields)
    except ValidationError as e:
        raise ApiError(422, one_line(e)) from None
    query.feedback()  # a bad list of examples, box or date is answered before the query is admitted
    one_query(query, upload)
    query.places()
    return query, upload


def parse_json(raw: bytes):
    """A JSON document, or a 400 naming what is wrong with it: malformed, not UTF-8, nested too deep for the
    parser (RecursionError), or a number too long to convert (ValueError, over 4300 digits)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(400, "malformed JSON body: nested too deep; a search request is one flat object") from None
    except UnicodeDecodeError as e:
        raise ApiError(400, f"malformed JSON body: not UTF-8 ({e.reason} at byte {e.start})") from None
    except ValueError as e:  # JSONDecodeError, and int() refusing a number of more than 4300 digits
        raise ApiError(400, f"malformed JSON body: {str(e).splitlines()[0]}") from None


def read_query(params) -> SearchRequest:
    """A search request from a URL's query string (GET /api/search.geojson): a caption or an item, no upload."""
    fields = dict(params)
    try:
        query = SearchRequest.model_validate(fields)
    except ValidationError as e:
        raise ApiError(422, one_line(e)) from None
    query.feedback()
    one_query(query, None, kinds=("text", "id"))
    query.places()
    return query

"""The service's API description, complete and true: the shapes of its answers (errors, items, GeoJSON) as the routes
document them, the OpenAPI document completed where FastAPI cannot see (the search body's schema, the errors every
route can answer), and /docs as Swagger UI served from the service's own files (the swagger-ui-bundle-v2 package),
so that it works with no network."""
from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from duch.pipeline.serve.api import FORM_FIELDS, PlaceOut, SearchRequest

DOCS_ASSETS = "/docs/assets"


class ErrorOut(BaseModel):
    """Every error the service answers, whatever its status."""

    error: str = Field(description="one line naming the field or item, what is wrong and what to send instead")
    status: int = Field(description="the HTTP status, repeated")


class CaptionOut(BaseModel):
    id: str = Field(description="IMAGE_ID#N")
    text: str


class ItemOut(BaseModel):
    """An archive item as GET /api/items/{id} answers it."""

    id: str
    modality: Literal["image", "text"]
    image_id: str = Field(description="the item's image (a caption's: the image it describes)")
    label: str | None
    file: str | None = Field(description="the image's file as the archive names it")
    captions: list[CaptionOut] = Field(description="the image's captions (a caption's: itself first)")
    place: PlaceOut | None = Field(description="a scene tile's place (null for other archives' images)")
    archive: str
    thumbnail: str = Field(description="URL of the image's thumbnail")


class FeatureOut(BaseModel):
    """A GeoJSON Feature (RFC 7946): a scene tile's footprint or a scene's outline, null where it has no lon/lat."""

    type: Literal["Feature"]
    id: str
    geometry: dict[str, Any] | None
    bbox: list[float] | None = None
    properties: dict[str, Any]


class FeatureCollectionOut(BaseModel):
    type: Literal["FeatureCollection"]
    features: list[FeatureOut]
    query: str | None = Field(None, description="a search's query (GET /api/search.geojson)")
    matched: int | None = Field(None, description="a search's items that the filters let through")


class HealthOut(BaseModel):
    status: Literal["ok"]
    archives: list[str]
    in_flight: int = Field(description="queries being answered now")


class ArchiveInfoOut(BaseModel):
    name: str
    generation: int = Field(description="changes with every duch add, remove and compact")
    images: int
    captions: int
    modalities: list[str]
    labels: list[str]
    places: bool = Field(description="an archive of scene tiles (bbox, dates and the map apply)")
    extent: list[float] | None = Field(description="the tiles' min lon, min lat, max lon, max lat")
    dates: list[str] | None = Field(description="the first and last acquisition date")
    scenes: int


class BasemapOut(BaseModel):
    url: str
    attribution: str | None


class InfoOut(BaseModel):
    """GET /api/info: what the service serves, and the limits a request must keep."""

    default: str = Field(description="the archive a request without `archive` searches")
    bits: int
    archives: list[ArchiveInfoOut]
    basemap: BasemapOut | None
    limits: dict[str, float] = Field(description="most_k, most_depth (offset + k), max_upload_mb, max_in_flight, "
                                                 "timeout_s")


class GeoJSONResponse(JSONResponse):
    media_type = "application/geo+json"


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before asking again", "required": True,
                               "schema": {"type": "integer", "minimum": 1}}}


def errors(**described: str) -> dict:
    """Routes' `responses` for their own errors, e.g. errors(e404="unknown id"): each an ErrorOut (a 503 with its
    Retry-After)."""
    out = {}
    for name, text in described.items():
        status = int(name[1:])
        out[status] = {"model": ErrorOut, "description": text, **({"headers": RETRY_AFTER} if status == 503 else {})}
    return out


def geojson_ok(description: str) -> dict:
    return {200: {"model": FeatureCollectionOut, "description": description}}


OVERLOADED = ("too many queries in flight (in all, or from this client address), or the query timed out; see "
              "Retry-After")
UNKNOWN_ARCHIVE = "no such archive"
# What every route can answer, before a handler runs (limits.py's and fairness.py's middleware): merged into each
# operation by complete_openapi. A POST also answers a foreign Origin (403) and a body that arrives too slowly
# (408): its errors.
EVERY_ROUTE = {400: "a Host header that is not one of the service's names",
               413: "a declared request body over the upload limit",
               429: "too many requests from this client address held at once after too many refusals (fairness.py); "
                    "see Retry-After"}
FOREIGN_ORIGIN = "a request from a page of another origin (its Origin header is not the service's own)"
SLOW_BODY = "a request body not received within the body timeout"
# POST /api/search reads its body itself (JSON or a multipart upload), so FastAPI cannot describe it.
SEARCH_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/SearchRequest"}},
    "multipart/form-data": {"schema": {"type": "object", "additionalProperties": False, "properties": {
        "image": {"type": "string", "format": "binary", "description": "an image file (JPEG, PNG, TIFF)"},
        **{f: {"type": "string", "description": "as in the JSON body"} for f in FORM_FIELDS}}}}}}}


def query_parameters() -> list[dict]:
    """SearchRequest's fields as GET /api/search.geojson's query parameters (bbox as MINLON,MINLAT,MAXLON,MAXLAT)."""
    fields = SearchRequest.model_json_schema()["properties"]
    out = []
    for name, schema in fields.items():
        schema = {k: v for k, v in schema.items() if k not in ("title", "description", "default")}
        if "anyOf" in schema:  # optional: null is the parameter left out
            kinds = [s for s in schema.pop("anyOf") if s.get("type") != "null"]
            schema.update(kinds[0] if len(kinds) == 1 else {"type": "string"})
        out.append({"name": name, "in": "query", "required": False, "schema": schema,
                    "description": fields[name].get("description", "")})
    return out


GEOJSON_QUERY = {"parameters": query_parameters()}


def complete_openapi(app: FastAPI) -> None:
    """app.openapi() completed (once, as FastAPI caches it): see `completed`."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = completed(build())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def completed(doc: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's document with the search body's schema, every error as an ErrorOut (FastAPI's own validation
    shape is never answered), the errors any route can answer, and one operation id per operation."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    body = SearchRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(body.pop("$defs", {}), SearchRequest=body, ErrorOut=ErrorOut.model_json_schema())
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    seen: set[str] = set()
    for operations in doc["paths"].values():
        for method, operation in operations.items():
            if operation.get("operationId") in seen:  # one route for GET and HEAD: FastAPI names both alike
                operation["operationId"] = f"{operation['operationId']}_{method}"
            seen.add(operation.get("operationId", ""))
            every_error(operation["responses"])
    return doc


def every_error(responses: dict[str, Any]) -> None:
    """An operation's responses with the errors any route can answer, each error an ErrorOut."""
    for status, text in EVERY_ROUTE.items():
        response = responses.setdefault(str(status), {})
        own = response.get("description")
        response["description"] = f"{own}; or {text}" if own and text not in own else own or text
        if status == 429:
            response["headers"] = RETRY_AFTER
    for status, response in responses.items():
        if status.startswith(("4", "5")):
            response["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}


def add_docs(app: FastAPI) -> None:
    """/docs: Swagger UI from the service's own files (the app is made with docs_url=None)."""
    from swagger_ui_bundle import swagger_ui_path

    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")

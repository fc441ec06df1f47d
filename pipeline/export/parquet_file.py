"""An archive's codes as one (Geo)Parquet file, written with pyarrow a row group at a time.

One row per live item of the current generation: images, then captions (`modality`), in archive order
(`archive_row`). For scene tiles the footprint is a WKB polygon in WGS84 lon/lat (`geometry`) described by
GeoParquet 1.1 metadata (CRS OGC:CRS84, the bbox covering columns, counterclockwise rings). The file's metadata key
`duch` records the run, code length, generation and the model that made the codes.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np

from duch.pipeline import DuchError
from duch.pipeline.export.columns import code_ints, valid_corners, wkb_polygons
from duch.pipeline.export.rows import Batch, ExportSource
from duch.pipeline.run.manifest import now_iso
from duch.pipeline.run.storage import publish, temp_path, write_errors

GEOPARQUET_VERSION = "1.1.0"
FILE_FORMAT = 1  # of the `duch` metadata


def need(module: str):
    """An export's optional dependency, or the one line that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DuchError(f"`duch export` needs {module.split('.')[0]}, which is not installed; install the export "
                        "extra: pip install 'duch[export]'") from None


def arrow_schema(source: ExportSource, include: tuple[str, ...], integer: bool):
    pa = need("pyarrow")
    fields = [pa.field("id", pa.string(), False), pa.field("modality", pa.string(), False),
              pa.field("archive_row", pa.int64(), False), pa.field("image_id", pa.string(), False),
              pa.field("caption_index", pa.int32()), pa.field("caption", pa.string())]
    if "text" in source.modalities:
        fields.append(pa.field("captions", pa.list_(pa.string())))
    fields += [pa.field("label", pa.string()), pa.field("path", pa.string()), pa.field("segment", pa.string()),
               pa.field("code", pa.binary(source.bits // 8), False)]
    if integer:
        fields.append(pa.field("code_int", pa.uint64(), False))
    if "continuous" in include:
        fields.append(pa.field("continuous", pa.list_(pa.float32(), source.bits)))
    if "embeddings" in include:
        dims = set(source.dims.values())
        fields.append(pa.field("embedding", pa.list_(pa.float32(), dims.pop() if len(dims) == 1 else -1)))
    if source.places:
        box = pa.struct([(name, pa.float64()) for name in ("xmin", "ymin", "xmax", "ymax")])
        fields += [pa.field("geometry", pa.binary()), pa.field("bbox", box), pa.field("date", pa.date32()),
                   pa.field("scene", pa.string()), pa.field("pixel_window", pa.list_(pa.int64(), 4)),
                   pa.field("crs", pa.string())]
    return pa.schema(fields)


def to_arrow(batch: Batch, schema):
    """One batch as a RecordBatch of `schema` (the columns another modality has are nulls)."""
    pa = need("pyarrow")
    n = len(batch)
    image = batch.modality == "image"
    c = batch.columns
    nulls = lambda t: pa.nulls(n, t)  # noqa: E731
    values = {"id": pa.array(batch.ids, pa.string()), "modality": pa.array([batch.modality] * n, pa.string()),
              "archive_row": pa.array(batch.archive_row, pa.int64()),
              "image_id": pa.array(batch.image_ids, pa.string()),
              "caption_index": nulls(pa.int32()) if image else pa.array(c["caption_index"], pa.int32()),
              "caption": nulls(pa.string()) if image else pa.array(c["text"], pa.string()),
              "captions": pa.array(batch.captions, pa.list_(pa.string())) if batch.captions is not None
              else nulls(pa.list_(pa.string())),
              "label": pa.array(c["label"], pa.string()) if image else nulls(pa.string()),
              "path": pa.array(c["path"], pa.string()) if image else nulls(pa.string()),
              "segment": pa.array([batch.segment] * n, pa.string())}
    codes = np.ascontiguousarray(c["codes"], np.uint8)
    values["code"] = pa.FixedSizeBinaryArray.from_buffers(pa.binary(codes.shape[1]), n,
                                                          [None, pa.py_buffer(codes.tobytes())])
    if "code_int" in schema.names:
        values["code_int"] = pa.array(code_ints(codes), pa.uint64())
    for name, array in (("continuous", batch.continuous), ("embedding", batch.embedding)):
        if name in schema.names and array is not None:
            flat = pa.array(np.asarray(array, np.float32).reshape(-1), pa.float32())
            width = array.shape[1]
            values[name] = (pa.FixedSizeListArray.from_arrays(flat, width) if schema.field(name).type.list_size > 0
                            else pa.ListArray.from_arrays(pa.array(np.arange(n + 1) * width, pa.int32()), flat))
    if "geometry" in schema.names:
        values.update(place_columns(batch, schema) if image else {})
    return pa.record_batch([values.get(f.name, pa.nulls(n, f.type)) for f in schema], schema=schema)


def place_columns(batch: Batch, schema) -> dict:
    pa = need("pyarrow")
    c, n = batch.columns, len(batch)
    valid = valid_corners(c["lonlat"])
    wkb = wkb_polygons(np.where(valid[:, None, None], c["lonlat"], 0.0))
    geometry = pa.Array.from_buffers(pa.binary(), n, [pa.py_buffer(np.packbits(valid, bitorder="little")),
                                                      pa.py_buffer(np.arange(n + 1, dtype=np.int32) * wkb.shape[1]),
                                                      pa.py_buffer(wkb.tobytes())], null_count=int(n - valid.sum()))
    bounds = np.asarray(c["bounds"], np.float64)
    box = pa.StructArray.from_arrays([pa.array(bounds[:, i]) for i in range(4)],
                                     names=["xmin", "ymin", "xmax", "ymax"], mask=pa.array(~valid))
    dates = np.array([d if d else "NaT" for d in c["date"]], "datetime64[D]")
    window = pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(c["window"], np.int64).reshape(-1)), 4)
    return {"geometry": geometry, "bbox": box, "date": pa.array(dates, pa.date32(), mask=np.isnat(dates)),
            "scene": pa.array(c["scene"], pa.string()), "pixel_window": window, "crs": pa.array(c["crs"], pa.string())}


def geo_metadata(bbox: list[float] | None) -> dict:
    """GeoParquet 1.1 `geo` metadata of the `geometry` column: WKB polygons in OGC:CRS84 (lon, lat), covered by the
    `bbox` struct column."""
    crs = need("pyproj").CRS("OGC:CRS84").to_json_dict()
    column = {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": crs, "orientation": "counterclockwise",
              "edges": "planar", "covering": {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}}
    if bbox is not None:
        column["bbox"] = bbox
    return {"version": GEOPARQUET_VERSION, "primary_column": "geometry", "columns": {"geometry": column}}


def file_metadata(source: ExportSource, rows: dict[str, int], include: tuple[str, ...]) -> dict:
    """What the `duch` metadata key records: where the rows come from, so a reader can tell a stale export."""
    return {"format": FILE_FORMAT, "created": now_iso(), "run": str(source.run.resolve()), "bits": source.bits,
            "generation": source.generation, "segments": [s.name for s in source.segments],
            "removed_items": source.removed, "model_sha256": source.model_sha256,
            "encode_fingerprints": source.fingerprints, "rows": rows, "include": list(include),
            "order": "archive_row: ties in Hamming distance are duch's archive order (--ties order)"}


def write_parquet(source: ExportSource, path: Path, include: tuple[str, ...], integer: bool, row_group: int,
                  force: bool) -> dict[str, int]:
    """The file at `path` (written beside it, then renamed: never half written); {modality: rows written}."""
    pq = need("pyarrow.parquet")
    path = Path(path)
    if path.exists() and not force:
        raise DuchError(f"{path} exists; give `force` to write over it")
    counts, bbox = source.census(row_group)
    extra = {"duch": json.dumps(file_metadata(source, counts, include))}
    if source.places:
        extra["geo"] = json.dumps(geo_metadata(bbox))
    schema = arrow_schema(source, include, integer).with_metadata(extra)
    tmp = temp_path(path)
    rows = dict.fromkeys(source.modalities, 0)
    try:
        with write_errors(path), pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for batch in source.batches(row_group, include):
                writer.write_batch(to_arrow(batch, schema), row_group_size=row_group)
                rows[batch.modality] += len(batch)
        if rows != counts:  # the generation is read once and never changes under a reader
            raise RuntimeError(f"{path}: wrote {rows} rows, counted {counts}")
        with write_errors(path):
            publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rows

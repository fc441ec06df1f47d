"""The Hamming top-k queries an export prints (and the docs' recipes): exact, nearest first, equal distances in
archive order, which is duch's own order with `ties="order"`."""
from __future__ import annotations

import numpy as np

from duch.pipeline.export.columns import bit_strings, code_ints


def example_box(bbox: tuple[float, float, float, float] | None) -> tuple[float, float, float, float]:
    return bbox or (-180.0, -90.0, 180.0, 90.0)


def duckdb_query(path: str, bits: int, code: np.ndarray | None, integer: bool, places: bool, k: int = 10,
                 bbox: tuple[float, float, float, float] | None = None) -> str:
    """DuckDB over the Parquet file: `bit_count(xor(code_int, q))` on the integer column (codes of up to 64 bits),
    else on the packed blob read as a BIT string (a BLOB cast to BIT keeps its bits in order)."""
    code = np.zeros(bits // 8, np.uint8) if code is None else np.asarray(code, np.uint8)
    if integer:
        distance = f"bit_count(xor(code_int, {int(code_ints(code[None])[0])}::UBIGINT))"
    else:
        distance = f"bit_count(xor(code::BIT, from_hex('{bytes(code).hex()}')::BIT))"
    where = ["modality = 'image'"]
    if places:
        x0, y0, x1, y1 = example_box(bbox)
        where.append(f"bbox.xmax > {x0} AND bbox.xmin < {x1} AND bbox.ymax > {y0} AND bbox.ymin < {y1}")
    quoted = path.replace("'", "''")
    return (f"SELECT id, {distance} AS distance FROM read_parquet('{quoted}')\n"
            f"WHERE {' AND '.join(where)}\nORDER BY distance, archive_row LIMIT {k};")


def postgres_query(table: str, bits: int, code: np.ndarray | None, places: bool, postgis: bool, k: int = 10,
                   bbox: tuple[float, float, float, float] | None = None) -> str:
    """PostgreSQL: `bit_count(code # B'...')` over the bit(K) column; with PostGIS the footprints whose interior
    meets the box (duch's --bbox: touching along an edge does not count), found through the GiST index."""
    code = np.zeros(bits // 8, np.uint8) if code is None else np.asarray(code, np.uint8)
    where = ["modality = 'image'"]
    if places:
        x0, y0, x1, y1 = example_box(bbox)
        if postgis:
            box = f"ST_MakeEnvelope({x0}, {y0}, {x1}, {y1}, 4326)"
            where.append(f"geometry && {box} AND ST_Relate(geometry, {box}, 'T********')")
        else:
            where.append(f"bbox_xmax > {x0} AND bbox_xmin < {x1} AND bbox_ymax > {y0} AND bbox_ymin < {y1}")
    return (f"SELECT id, bit_count(code # B'{bit_strings(code[None])[0]}') AS distance FROM {table}\n"
            f"WHERE {' AND '.join(where)}\nORDER BY distance, archive_row LIMIT {k};")

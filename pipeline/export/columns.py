"""The column forms an export writes, as pure functions over numpy arrays: packed codes as unsigned integers and
as SQL bit strings, tile footprints as (E)WKB polygons.

A packed code (uint8 [K/8], numpy packbits: the first bit is the high bit of the first byte) read as one
big-endian number is `code_int`, so `bit_count(xor(code_int, q))` in DuckDB is duch's Hamming distance; the same
bits written out as '0101...' are PostgreSQL's `bit(K)`, where `bit_count(code # q)` is.
"""
from __future__ import annotations

import numpy as np

WGS84_SRID = 4326
_EWKB_SRID_FLAG = 0x20000000
_POLYGON = 3


def code_ints(codes: np.ndarray) -> np.ndarray:
    """Packed codes [N, B] (B <= 8 bytes) -> [N] uint64: the bytes as one big-endian number."""
    codes = np.ascontiguousarray(codes, np.uint8)
    if codes.shape[1] > 8:
        raise ValueError(f"codes of {codes.shape[1] * 8} bits do not fit a 64-bit integer")
    padded = np.zeros((len(codes), 8), np.uint8)
    padded[:, 8 - codes.shape[1]:] = codes
    return padded.view(">u8")[:, 0].astype(np.uint64)


def bit_strings(codes: np.ndarray) -> list[str]:
    """Packed codes [N, B] -> '0101...' strings of 8B characters (SQL bit(K) literals)."""
    bits = np.unpackbits(np.ascontiguousarray(codes, np.uint8), axis=1) + ord("0")
    width = bits.shape[1]
    return [s.decode() for s in np.ascontiguousarray(bits).view(f"S{width}")[:, 0]] if len(bits) else []


def ccw_rings(corners: np.ndarray) -> np.ndarray:
    """Corners [N, 4, 2] (ul, ur, lr, ll) -> closed rings [N, 5, 2], counterclockwise (GeoJSON's and GeoParquet's
    exterior-ring orientation), as data.geo.ccw_ring orders one."""
    c = np.asarray(corners, np.float64)
    x, y = c[..., 0], c[..., 1]
    area2 = np.sum(x * np.roll(y, -1, axis=1) - np.roll(x, -1, axis=1) * y, axis=1)
    c = np.where((area2 < 0)[:, None, None], c[:, ::-1], c)
    return np.concatenate([c, c[:, :1]], axis=1)


def wkb_polygons(corners: np.ndarray, srid: int | None = None) -> np.ndarray:
    """Corners [N, 4, 2] -> [N, L] uint8: each row one polygon as little-endian WKB (ISO), or as PostGIS's EWKB
    with its SRID when `srid` is given. Rows with a NaN corner are to be written as nulls (`valid_corners`)."""
    rings = ccw_rings(corners)
    fields = [("order", "u1"), ("type", "<u4")] + ([("srid", "<u4")] if srid is not None else []) + [
        ("rings", "<u4"), ("points", "<u4"), ("xy", "<f8", (10,))]
    out = np.zeros(len(rings), np.dtype(fields))
    out["order"], out["rings"], out["points"] = 1, 1, 5
    out["type"] = _POLYGON | (_EWKB_SRID_FLAG if srid is not None else 0)
    if srid is not None:
        out["srid"] = srid
    out["xy"] = rings.reshape(len(rings), 10)
    return out.view(np.uint8).reshape(len(rings), -1)


def valid_corners(corners: np.ndarray) -> np.ndarray:
    """[N] bool: every corner known (an ungeoreferenced scene's tiles have NaN lon/lat and no geometry)."""
    return np.isfinite(np.asarray(corners, np.float64)).all(axis=(1, 2))

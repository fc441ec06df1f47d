"""Code files: one HDF5 file per code length, `codes-K.h5`, written by encode-archive, read by search/evaluate.

    attrs            bits, model_sha256, extract_fingerprint, image_rows, text_rows
    image/ids        [N] str    image/path [N] str    image/label [N] str
    image/codes      [N, K/8] uint8, packed sign bits (1 for h >= 0), big-endian bit order (numpy packbits)
    image/continuous [N, K] float16, the heads' tanh outputs (only with --continuous: for --rerank)
    text/image_id    [M] str    text/caption_index [M] int32    text/text [M] str
    text/codes, text/continuous as for images, one row per real caption (rule-based rewrites are not archived)
    image/scene, image/window, ...  an archive of scene tiles only: where each tile is (PLACES)

Every dataset has its final size from the start and is contiguous and uncompressed, so the file is filled
shard by shard with flat memory, and the codes can be memory-mapped straight from the file by `open_codes`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from duch.pipeline import DuchError
from duch.pipeline.formats.shards import STRING
from duch.pipeline.run.storage import publish, temp_path, write_errors

MODALITIES = ("image", "text")
META = {"image": ("ids", "path", "label"), "text": ("image_id", "caption_index", "text")}
# A scene tile's place (data/scenes.py, place_columns): name -> (dtype, shape of one row). `path` is the scene file.
PLACES = {
    "scene": (STRING, ()),  # the tile id's prefix
    "window": (np.int64, (4,)),  # col_off, row_off, width, height in the scene's pixels
    "crs": (STRING, ()),  # "EPSG:32611" or WKT; "" where the scene had none (footprint in pixels)
    "footprint": (np.float64, (4, 2)),  # corners ul, ur, lr, ll in the CRS
    "lonlat": (np.float64, (4, 2)),  # the same corners in WGS84 lon/lat (NaN without a CRS)
    "bounds": (np.float64, (4,)),  # min lon, min lat, max lon, max lat of those corners
    "date": (STRING, ()),  # acquisition date YYYY-MM-DD, '' when unknown
    "bands": (np.int32, (3,)),  # the scene's bands read as R, G, B
    "stretch": (np.float64, (2,)),  # the scene's >8-bit stretch limits (NaN for 8-bit scenes)
}

# Kept where a run has them (a declared fill, STAC items; data/scenes.py source_columns), JSON strings: what reads
# a tile's pixels beyond its scene file and bands ("source"), and its STAC item as hits show it ("stac").
PLACE_EXTRAS = {"source": (STRING, ()), "stac": (STRING, ())}


def codes_name(bits: int) -> str:
    return f"codes-{bits}.h5"


def caption_key(image_id, caption_index) -> str:
    """A caption's archive id: IMAGE_ID#CAPTION_INDEX."""
    return f"{image_id}#{int(caption_index)}"


class CodeWriter:
    """Fills a code file row range by row range; `close()` publishes it under its name, `abort()` removes it. A write
    that fails for want of space or permission raises a DuchError naming the file (pipeline.storage)."""

    def __init__(self, path: Path, bits: int, rows: dict[str, int], continuous: bool, attrs: dict,
                 places: bool | tuple[str, ...] = False):
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        self.tmp.unlink(missing_ok=True)
        self.file: h5py.File | None = None
        with write_errors(self.path):
            try:
                self._create(bits, rows, continuous, attrs, places)
            except BaseException:
                self.abort()
                raise

    def _create(self, bits: int, rows: dict[str, int], continuous: bool, attrs: dict,
                places: bool | tuple[str, ...]) -> None:
        columns = {**PLACES, **PLACE_EXTRAS}
        names = tuple(PLACES) if places is True else tuple(places or ())
        self.file = file = h5py.File(self.tmp, "w")
        self.filled = dict.fromkeys(rows, 0)
        for modality, n in rows.items():
            group = file.create_group(modality)
            for name in META[modality]:
                dtype = np.int32 if name == "caption_index" else STRING
                group.create_dataset(name, shape=(n,), dtype=dtype)
            for name, (dtype, shape) in (((c, columns[c]) for c in names) if modality == "image" else ()):
                group.create_dataset(name, shape=(n, *shape), dtype=dtype)
            group.create_dataset("codes", shape=(n, bits // 8), dtype=np.uint8)
            if continuous:
                group.create_dataset("continuous", shape=(n, bits), dtype=np.float16)
        for key, value in {**attrs, "bits": bits, **{f"{m}_rows": n for m, n in rows.items()}}.items():
            file.attrs[key] = value

    def append(self, modality: str, arrays: dict[str, np.ndarray]) -> None:
        assert self.file is not None  # open from __init__ on
        group = self.file[modality]
        start = self.filled[modality]
        n = len(arrays["codes"])
        with write_errors(self.path):
            for name, value in arrays.items():
                group[name][start:start + n] = value
        self.filled[modality] = start + n

    def close(self) -> None:
        assert self.file is not None  # open from __init__ on
        expected = {m: self.file[m]["codes"].shape[0] for m in self.filled}
        with write_errors(self.path):
            self.file.close()  # HDF5 flushes what it still holds here: where a full disk often shows
            if expected != self.filled:
                self.tmp.unlink(missing_ok=True)
                raise RuntimeError(f"{self.path}: filled {self.filled} rows, expected {expected}")
            publish(self.tmp, self.path)

    def abort(self) -> None:
        try:
            if self.file is not None:
                self.file.close()
        except Exception:  # closing flushes, and a full disk fails that too; the file goes anyway
            pass
        finally:
            self.tmp.unlink(missing_ok=True)


@dataclass
class CodeTable:
    """One modality of a code file: metadata in memory, codes (and continuous outputs) memory-mapped."""

    modality: str
    codes: np.ndarray  # [N, K/8] uint8, memory-mapped
    continuous: np.ndarray | None  # [N, K] float16, memory-mapped
    meta: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.codes)

    @functools.cached_property
    def row_of(self) -> dict[str, int]:
        """Archive id -> row: image ids, or IMAGE_ID#CAPTION_INDEX for captions (needs the metadata)."""
        if self.modality == "image":
            keys = map(str, self.meta["ids"])
        else:
            keys = map(caption_key, self.meta["image_id"], self.meta["caption_index"])
        return {key: row for row, key in enumerate(keys)}


def _mapped(path: Path, dataset: h5py.Dataset) -> np.ndarray:
    if len(dataset) == 0:
        return np.zeros(dataset.shape, dataset.dtype)
    offset = dataset.id.get_offset()
    if offset is None or dataset.chunks is not None:  # not contiguous: read it instead
        return dataset[()]
    return np.memmap(path, mode="r", dtype=dataset.dtype, offset=offset, shape=dataset.shape)


def open_codes(path: Path, with_meta: bool = True,
               modalities: tuple[str, ...] = MODALITIES) -> tuple[dict, dict[str, CodeTable]]:
    """(attrs, {modality: CodeTable}) of a finished code file (of `modalities` only); a file HDF5 cannot read
    (damaged, and read without its checksum: `search --no-verify`) is one line asking for it to be made again."""
    path = Path(path)
    try:
        return _open_codes(path, with_meta, modalities)
    except Exception as e:  # h5py raises OSError, RuntimeError, KeyError, ValueError... on a damaged file
        raise DuchError(f"{path}: unreadable code file ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                        "redo the encode-archive stage of its run with `force` to make it again") from None


def _open_codes(path: Path, with_meta: bool, modalities: tuple[str, ...]) -> tuple[dict, dict[str, CodeTable]]:
    tables = {}
    with h5py.File(path, "r") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        for modality in modalities:
            if modality not in f:
                continue
            group = f[modality]
            meta = {}
            if with_meta:
                for name in (*META[modality], *(p for p in (*PLACES, *PLACE_EXTRAS) if modality == "image"
                                                and p in group)):
                    ds = group[name]
                    meta[name] = ds.asstr()[()] if h5py.check_string_dtype(ds.dtype) else ds[()]
            tables[modality] = CodeTable(modality, _mapped(path, group["codes"]),
                                         _mapped(path, group["continuous"]) if "continuous" in group else None, meta)
    # Every code file holds image codes, packed as bytes, and each table one row per item in all its arrays.
    if "image" in modalities and "image" not in tables:
        raise KeyError("no image codes")
    for table in tables.values():
        if table.codes.dtype != np.uint8 or table.codes.ndim != 2 or (table.continuous is not None and (
                table.continuous.dtype.kind != "f" or table.continuous.shape[1:] != (8 * table.codes.shape[1],))):
            raise TypeError(f"the {table.modality} codes are {table.codes.dtype} {table.codes.shape}")
        lengths = {len(table.codes), *(len(v) for v in table.meta.values()),
                   *(() if table.continuous is None else (len(table.continuous),))}
        if len(lengths) > 1:
            raise ValueError(f"the {table.modality} arrays hold {sorted(lengths)} rows")
    return attrs, tables

"""Fuzzing image files as extract and `search --image` read them (data/images.load_image, then the augmented views):
real small JPEG, PNG and TIFF files cut short, with bytes overwritten or inserted, with the wrong magic, and with
headers declaring any size, band count or bit depth. The property (tests/fuzzkit.py): an 8-bit RGB image, or an
ImageLoadError with a one-line reason; never another exception, a hang, or memory beyond the documented bound
(docs/stages.md, "Bad input": about 89 Mpx decoded, measured by bench/fuzz_bounds.py)."""
from __future__ import annotations

import io
import resource
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import event, given
from hypothesis import strategies as st
from PIL import Image

from duch.data.augment import augment_image, view_rng
from duch.data.images import ImageLoadError, load_image

from .conftest import ASSETS
from .fuzzkit import examples, one_line, time_bound

pytestmark = pytest.mark.fuzz

# Growth of this process's peak resident memory any one example may cause (the bound of data/images.py for the
# largest image it decodes, 89 Mpx as RGBA, is ~360 MB; bench/fuzz_bounds.py measures the worst inputs apart).
MEMORY_BOUND_MB = 1500


def _seeds() -> dict[str, bytes]:
    """Small real files of every kind the readers take (a UC Merced tile, shrunk)."""
    tile = Image.open(ASSETS / "102.jpg").convert("RGB").resize((24, 16))
    out = {}

    def save(name, img, **kw):
        buffer = io.BytesIO()
        img.save(buffer, **kw)
        out[name] = buffer.getvalue()

    save("rgb.jpg", tile, format="JPEG", quality=80)
    save("progressive.jpg", tile, format="JPEG", progressive=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif.jpg", tile, format="JPEG", exif=exif)
    save("cmyk.jpg", tile.convert("CMYK"), format="JPEG")
    save("rgb.png", tile, format="PNG")
    save("palette.png", tile.convert("P"), format="PNG", transparency=0)
    save("grey16.png", tile.convert("I;16"), format="PNG")
    rgb = np.asarray(tile)
    for name, array, kw in [("rgb8.tif", rgb, {}), ("rgbn16.tif", np.dstack([rgb, rgb[..., :1]]).astype(np.uint16) * 40,
                                                   {"photometric": "minisblack"}),
                            ("float.tif", rgb.astype(np.float32) / 7, {"photometric": "rgb"}),
                            ("tiled.tif", np.zeros((32, 32), np.uint8), {"tile": (16, 16), "compression": "zlib"}),
                            ("planar.tif", np.moveaxis(rgb, -1, 0).copy(), {"photometric": "rgb",
                                                                             "planarconfig": "separate"})]:
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, array, **kw)
        out[name] = buffer.getvalue()
    return out


SEEDS = _seeds()


def _png_with(seed: bytes, width: int, height: int, depth: int, colour: int) -> bytes:
    """The PNG `seed` with its IHDR declaring other dimensions, bit depth and colour type (a valid CRC, so the
    decoder believes it)."""
    body = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    ihdr = struct.pack(">I", 13) + b"IHDR" + body + struct.pack(">I", zlib.crc32(b"IHDR" + body))
    return seed[:8] + ihdr + seed[8 + 25:]


def _jpeg_with(seed: bytes, width: int, height: int) -> bytes:
    """The JPEG `seed` with its frame header (SOF0 or SOF2) declaring other dimensions."""
    data = bytearray(seed)
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at >= 0:
            data[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _tiff_with(seed: bytes, tags: dict[str, int]) -> bytes:
    """The TIFF `seed` with tag values overwritten in place (ImageWidth, ImageLength, SamplesPerPixel, ...)."""
    data = bytearray(seed)
    with tifffile.TiffFile(io.BytesIO(seed)) as tif:
        found = tif.pages[0].tags
        for name, value in tags.items():
            tag = found.get(name)
            if tag is None or tag.count != 1:
                continue
            size = {3: 2, 4: 4}.get(tag.dtype, 0)
            if size:
                data[tag.valueoffset:tag.valueoffset + size] = (value % (1 << (8 * size))).to_bytes(size, "little")
    return bytes(data)


big = st.one_of(st.integers(0, 70_000), st.sampled_from([0, 1, 9_459, 9_460, 65_535, 2**31 - 1, 2**32 - 1]))
headers = st.one_of(
    st.builds(_png_with, st.sampled_from([SEEDS["rgb.png"], SEEDS["palette.png"], SEEDS["grey16.png"]]), big, big,
              st.sampled_from([1, 2, 4, 8, 16, 3, 0, 255]), st.sampled_from([0, 2, 3, 4, 6, 1, 7])),
    st.builds(_jpeg_with, st.sampled_from([SEEDS["rgb.jpg"], SEEDS["progressive.jpg"], SEEDS["cmyk.jpg"]]),
              st.integers(0, 65_535), st.integers(0, 65_535)),
    st.builds(_tiff_with, st.sampled_from([SEEDS[n] for n in SEEDS if n.endswith(".tif")]), st.dictionaries(
        st.sampled_from(["ImageWidth", "ImageLength", "SamplesPerPixel", "BitsPerSample", "RowsPerStrip",
                         "TileWidth", "TileLength", "StripByteCounts", "StripOffsets", "Compression",
                         "PhotometricInterpretation", "PlanarConfiguration", "SampleFormat"]),
        st.one_of(big, st.integers(0, 2**32 - 1)), max_size=3)),
)


@st.composite
def mutated(draw):
    """A seed cut short, with bytes overwritten or inserted, or its magic replaced."""
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        kind = draw(st.sampled_from(["set", "insert", "delete"]))
        patch = draw(st.binary(min_size=1, max_size=4))
        if kind == "set":
            data[at:at + len(patch)] = patch
        elif kind == "insert":
            data[at:at] = patch
        else:
            del data[at:at + len(patch)]
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    if draw(st.integers(0, 9)) == 0:
        data[:4] = draw(st.sampled_from([b"\x89PNG", b"\xff\xd8\xff\xe0", b"II*\x00", b"MM\x00*", b"GIF8",
                                         b"BM\x00\x00",
                                         b"\x00\x00\x00\x00"]))
    return bytes(data)


def check_image(tmp: Path, data: bytes, suffix: str) -> None:
    path = tmp / f"image{suffix}"
    path.write_bytes(data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with time_bound(30):
            img = load_image(path)
            assert img.mode == "RGB" and img.width > 0 and img.height > 0
            augment_image(img, view_rng(0, "fuzz", 1))  # what extract (and an image query) does next
        event(f"accepted {suffix}")
    except ImageLoadError as e:
        event(f"refused: {one_line(e)[:30]}")
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown < MEMORY_BOUND_MB, f"peak memory grew by {grown:.0f} MB"


@examples("image")
@given(data=st.one_of(mutated(), st.binary(max_size=64)), suffix=st.sampled_from([".jpg", ".png", ".tif", ".TIFF"]))
def test_image_files_fuzzed(tmp_path_factory, data, suffix):
    check_image(tmp_path_factory.mktemp("img", numbered=True), data, suffix)


@examples("image-header")
@given(data=headers, suffix=st.sampled_from([".jpg", ".png", ".tif"]))
def test_image_headers_declaring_any_size_fuzzed(tmp_path_factory, data, suffix):
    check_image(tmp_path_factory.mktemp("hdr", numbered=True), data, suffix)


def stretch_reference(array: np.ndarray) -> np.ndarray:
    """The conversion rule of more-than-8-bit rasters as one pass over the whole raster in float64 (what
    raster_to_rgb8 computed before it went block by block): 2nd-98th percentile of the finite values onto 0..255."""
    a = np.asarray(array)
    a = a[:, :, None] if a.ndim == 2 else np.moveaxis(a, 0, -1) if a.shape[0] <= 16 and a.shape[0] < a.shape[2] else a
    a = a[:, :, :3] if a.shape[2] >= 3 else np.repeat(a[:, :, :1], 3, axis=2)
    values = a.astype(np.float64)
    low, high = np.percentile(values[np.isfinite(values)], [2, 98])
    high = low + 1.0 if high <= low else high
    return np.round(np.clip((np.nan_to_num(values, nan=low) - low) / (high - low), 0.0, 1.0) * 255).astype(np.uint8)


@examples("stretch")
@given(data=st.data(), dtype=st.sampled_from(["uint16", "int16", "uint32", "int32", "int64", "uint64", "float32",
                                              "float64", "int8"]),
       shape=st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(1, 6)))
def test_the_stretch_in_row_blocks_gives_the_bytes_of_one_pass_over_the_raster(data, dtype, shape):
    """raster_to_rgb8 stretches row block by row block, its percentiles from one copy no wider than needed (the
    largest raster accepted took 11.6 GB, bench/fuzz_bounds.py): every byte as one float64 pass gives it."""
    from hypothesis.extra.numpy import arrays

    from duch.data.images import raster_to_rgb8

    raster = data.draw(arrays(dtype, shape))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow of a range wider than float64 holds, both ways
        try:
            expected = stretch_reference(raster)
        except IndexError:  # no finite value at all
            with pytest.raises(ImageLoadError, match="raster holds no finite values"):
                raster_to_rgb8(raster)
            return
        assert np.array_equal(raster_to_rgb8(raster), expected)

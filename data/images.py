"""Loading any archive image as 8-bit RGB.

Conversion rules (documented in docs/stages.md):
- JPEG/PNG/8-bit TIFF: EXIF orientation applied; greyscale, palette, CMYK converted to RGB; transparent pixels
  are composited onto black.
- Multi-band rasters: bands 1-3 are taken as R, G, B (a 4-band RGB+NIR TIFF drops NIR); one band is repeated.
- More than 8 bits (16-bit, 32-bit, float): one linear stretch shared by the three bands, from the 2nd to
  the 98th percentile of their values onto 0..255, so colours keep their balance and a few hot pixels do not
  darken the image.
"""
from __future__ import annotations

import io
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

_PIL_8BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


class ImageLoadError(Exception):
    """An image that cannot be used; the message is the reason a user sees in the rejects."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as 8-bit RGB, by the module's rules; an ImageLoadError (one line, the reason a user sees)
    for any file that cannot be used, whatever the decoder raised."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageLoadError("missing file") from None
    except OSError as e:
        raise ImageLoadError(f"cannot read file: {e.strerror}") from None
    if size == 0:
        raise ImageLoadError("empty file (0 bytes)")
    return _checked(path, path.suffix.lower() in (".tif", ".tiff"))


def load_image_bytes(data: bytes) -> Image.Image:
    """An image held in memory (an upload), by the same rules as a file; TIFF is told by its magic bytes, since
    an upload's name is the sender's to choose."""
    if not data:
        raise ImageLoadError("empty file (0 bytes)")
    return _checked(io.BytesIO(data), data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"))


def _checked(source: Path | io.BytesIO, tiff: bool) -> Image.Image:
    try:
        img = _decode(source, tiff)
    except ImageLoadError:
        raise
    except Exception as e:  # decoders raise many types on malformed files (ValueError, SyntaxError, struct.error...)
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ImageLoadError(f"cannot decode image: {reason}") from None
    if not img.width or not img.height:  # a damaged header can decode to no pixels, which no encoder takes
        raise ImageLoadError(f"image has no pixels ({img.width} x {img.height})")
    return img


def _decode(source: Path | io.BytesIO, tiff: bool) -> Image.Image:
    if tiff:
        # tifffile reads multi-band and 16-bit rasters faithfully; PIL misreads some (4 x uint16 as RGBA).
        array = _read_tiff(source)
        if array is not None:
            return Image.fromarray(raster_to_rgb8(array))
        if isinstance(source, io.BytesIO):
            source.seek(0)
    try:
        with warnings.catch_warnings():
            # PIL's warnings on a damaged file's metadata ("Corrupt EXIF data") are noise: it is used or rejected.
            warnings.simplefilter("ignore", UserWarning)
            # A huge image is refused rather than decoded into gigabytes of memory.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                check_decoded_size(img.width, img.height, len(img.getbands()))  # PIL reads the first frame only
                if img.mode in _PIL_8BIT_MODES:
                    img = ImageOps.exif_transpose(img)
                    img.load()
                    return _to_rgb(img)
                array = np.asarray(img)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise too_large(int(found.group(1)) if found else None) from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError("not a recognised image (expected JPEG, PNG or TIFF)") from None
    except OSError as e:
        if "truncated" in str(e):
            raise ImageLoadError("truncated image file") from None
        raise ImageLoadError(f"cannot decode image: {' '.join(str(e).split())}") from None
    return Image.fromarray(raster_to_rgb8(array))


# The decoded-size rule, one for every reader (docs/stages.md, "Bad input"): PIL's pixel limit as before, and at
# most as many values (pixels x samples x pages) as PIL itself decodes at that limit, an RGBA or CMYK image.
VALUES_PER_PIXEL = 4
MAX_PAGES = 1024  # a TIFF's pages are counted from their headers, one by one: so many at most
BANDS_AS_PAGES = 16  # up to so many single-band pages of one shape are a band-first raster (tifffile writes them)


def max_values() -> int | None:
    """The most values (pixels x samples x pages) a file may declare; None where PIL's limit is switched off."""
    return VALUES_PER_PIXEL * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None


def check_decoded_size(width: int, height: int, samples: int = 1, pages: int = 1) -> None:
    """An ImageLoadError where a file's header declares more than the rule allows; called before any pixel is
    decoded, since a small compressed file can unpack to gigabytes."""
    if not Image.MAX_IMAGE_PIXELS:
        return
    pixels = width * height
    if pixels > Image.MAX_IMAGE_PIXELS:
        raise too_large(pixels)
    values = pixels * samples * pages
    if values > (limit := max_values() or 0):
        raise ImageLoadError(f"image too large ({width} x {height} pixels x {samples} samples x {pages} "
                             f"page{'s' if pages != 1 else ''} = {values} values; the limit against decompression "
                             f"bombs is {limit} values, {Image.MAX_IMAGE_PIXELS} pixels of {VALUES_PER_PIXEL} "
                             "samples)")


def too_large(pixels: int | None) -> ImageLoadError:
    """More pixels than PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS, about 89 Mpx), refused unread."""
    size = f"{pixels} pixels" if pixels else "too many pixels"
    return ImageLoadError(f"image too large ({size}; the limit against decompression bombs is "
                          f"{Image.MAX_IMAGE_PIXELS} pixels)")


def _read_tiff(path: Path | io.BytesIO) -> np.ndarray | None:
    """The raster, or None where tifffile cannot decode it (PIL gets a try then)."""
    import tifffile

    quiet = logging.getLogger("tifffile")  # its diagnostics on a damaged file are noise: it is used or rejected
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with tifffile.TiffFile(path) as tif:
            # tifffile has no bomb check of its own: the size is read from the headers before any pixel.
            read = _tiff_pages_read(tif)
            if len(read) == 1:
                return read[0].asarray()
            return np.stack([page.asarray() for page in read])
    except ImageLoadError:
        raise
    except Exception:  # tifffile raises many types for corrupt or exotic files
        return None
    finally:
        quiet.setLevel(level)


def _tiff_pages_read(tif) -> list:
    """The pages a TIFF's image is read from, once the rule holds for every page it declares: the first page;
    or the first three of up to BANDS_AS_PAGES single-band pages of one shape and type, which are the bands of one
    raster (tifffile writes a band-first array so). Reduced-resolution copies (overviews) and masks are not
    images of their own and do not count."""
    first = tif.pages.first
    if not first.imagewidth or not first.imagelength:  # a damaged header: named as the decoded image would be
        raise ImageLoadError(f"image has no pixels ({first.imagewidth} x {first.imagelength})")
    samples = int(first.samplesperpixel) * int(first.imagedepth)
    check_decoded_size(int(first.imagewidth), int(first.imagelength), samples)
    pages, values, same = 1, int(first.imagewidth) * int(first.imagelength) * samples, [first]
    tif.pages.cache = False  # a page is parsed, counted and let go: the walk holds no more than one
    for k in range(1, MAX_PAGES + 1):
        try:
            page = tif.pages[k]
        except IndexError:
            break
        if page.subfiletype & 0b101:  # FILETYPE_REDUCEDIMAGE, FILETYPE_MASK
            continue
        pages += 1
        values += int(page.imagewidth) * int(page.imagelength) * int(page.samplesperpixel) * int(page.imagedepth)
        if pages <= BANDS_AS_PAGES and page.shape == first.shape and page.dtype == first.dtype:
            same.append(page)
        if (limit := max_values()) and values > limit:
            raise ImageLoadError(f"image too large (its first {pages} pages declare {values} values; the limit "
                                 f"against decompression bombs is {limit} values, {Image.MAX_IMAGE_PIXELS} pixels "
                                 f"of {VALUES_PER_PIXEL} samples)")
    else:
        raise ImageLoadError(f"image has more than {MAX_PAGES} pages (a TIFF read here is one image)")
    if samples == 1 and len(same) == pages <= BANDS_AS_PAGES:
        return same[:3]
    return [first]


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("P", "PA") and ("transparency" in img.info or img.mode == "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def raster_to_rgb8(array: np.ndarray) -> np.ndarray:
    """Any HxW, HxWxC or CxHxW raster -> HxWx3 uint8, by the module's rules."""
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[:, :, None]
    elif a.ndim == 3 and a.shape[0] <= 16 and a.shape[0] < a.shape[2]:
        a = np.moveaxis(a, 0, -1)  # band-first rasters, as some TIFF writers store them
    if a.ndim != 3:
        raise ImageLoadError(f"unsupported raster shape {array.shape}")
    a = a[:, :, :3]
    if a.shape[2] < 3:
        a = np.repeat(a[:, :, :1], 3, axis=2)
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == bool:
        return np.ascontiguousarray(a.astype(np.uint8) * 255)
    low, high = _stretch_range(a)
    if high <= low:
        high = low + 1.0
    # Row block by row block, in float64 as one pass over the whole raster would compute it (the same bytes), so
    # that the largest raster accepted costs a block of float64, not several copies of itself (measured:
    # bench/fuzz_bounds.py, docs/results.md, 11).
    out = np.empty(a.shape, np.uint8)
    step = _block_rows(a)
    for r in range(0, a.shape[0], step):
        out[r:r + step] = apply_stretch(a[r:r + step], low, high)
    return out


def _block_rows(a: np.ndarray) -> int:
    return max(1, (4 << 20) // max(1, a.shape[1] * a.shape[2]))  # ~4M values (32 MB of float64) a block


def _stretch_range(a: np.ndarray) -> tuple[float, float]:
    """The 2nd and 98th percentiles of the raster's finite values, equal to numpy's over them as float64, from one
    copy no wider than needed: integers keep a dtype in which differences are exact (what the interpolation
    takes), floats are gathered block by block."""
    if a.dtype.kind == "f":
        step = _block_rows(a)
        blocks = [a[r:r + step] for r in range(0, a.shape[0], step)]
        finite = np.empty(sum(int(np.count_nonzero(np.isfinite(b))) for b in blocks), np.float64)
        at = 0
        for block in blocks:
            kept = block[np.isfinite(block)]
            finite[at:at + kept.size] = kept
            at += kept.size
    elif a.dtype.kind in "ui" and a.dtype.itemsize < 8:
        wider = a.dtype if a.dtype.kind == "u" else np.dtype(f"int{16 * a.dtype.itemsize}")
        finite = a.astype(wider).ravel()  # a copy: the percentile below sorts it in place
    else:
        finite = a.astype(np.float64).ravel()
    if finite.size == 0:
        raise ImageLoadError("raster holds no finite values")
    low, high = np.percentile(finite, [2, 98], overwrite_input=True)
    return float(low), float(high)


def stretch_limits(values: np.ndarray) -> tuple[float, float]:
    """The >8-bit rule's limits: the 2nd and 98th percentiles of the finite `values` given (a raster's, or a
    scene's valid pixels), one pair for all three bands so colours keep their balance."""
    if values.size == 0:
        raise ImageLoadError("raster holds no finite values")
    low, high = np.percentile(values, [2, 98])
    return float(low), float(high if high > low else low + 1.0)


def apply_stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """`values` mapped linearly from [low, high] onto 0..255 (clipped; NaN as `low`), as uint8."""
    values = np.asarray(values, np.float64)
    stretched = np.clip((np.nan_to_num(values, nan=low) - low) / (high - low), 0.0, 1.0)
    return np.ascontiguousarray(np.round(stretched * 255).astype(np.uint8))

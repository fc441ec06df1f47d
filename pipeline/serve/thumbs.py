"""Thumbnails of archive images: converted by extract's rules (TIFF, 16-bit, 4-band, palette...; data.images),
or for a scene tile rendered from its scene window as extract read it (bands, the scene's stretch; data.scenes),
scaled to fit a square, JPEG-encoded, and cached under RUN/serve/thumbs/ (written with atomic_write).

A cached file is named by the source file's path, size and modification time, the tile's window, bands and
stretch, and the thumbnail size: an image replaced on disk gets a new thumbnail, an unchanged one is converted
once. Callers pass a path the archive's metadata names, never one from a request.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from PIL import Image

from duch.data.images import ImageLoadError
from duch.pipeline import DuchError
from duch.pipeline.retrieval.render import render
from duch.pipeline.run.storage import atomic_write

JPEG_QUALITY = 85


class NoThumbnail(Exception):
    """The archive's image file is missing or cannot be decoded; the message says which and why."""


def thumbnail_jpeg(img: Image.Image, size: int) -> bytes:
    """An RGB image scaled (down only, aspect kept) to fit size x size, as JPEG bytes."""
    img = img.copy()
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


class Thumbnails:
    """Thumbnails of one archive, cached in `folder` (kept in memory only when the folder cannot be written)."""

    def __init__(self, folder: Path, size: int = 256):
        self.folder, self.size = Path(folder), size
        self.writable = True

    def cache_name(self, source: Path, place=None) -> Path:
        st = source.stat()
        tile = "" if place is None else f"\0{place.window}\0{place.bands}\0{place.stretch}"
        key = f"{source.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{self.size}{tile}"
        key = hashlib.sha256(key.encode()).hexdigest()
        return self.folder / key[:2] / f"{key[2:32]}.jpg"

    def get(self, source: Path, place=None) -> bytes:
        """The thumbnail of an image file, or with `place` (retrieval.places.Place) of that scene tile."""
        try:
            cached = self.cache_name(source, place)
        except FileNotFoundError:
            raise NoThumbnail(f"image file {source} is missing") from None
        except OSError as e:
            raise NoThumbnail(f"image file {source} cannot be read: {e.strerror}") from None
        if cached.is_file():
            return cached.read_bytes()
        try:
            data = thumbnail_jpeg(render(source, place), self.size)
        except ImageLoadError as e:
            raise NoThumbnail(f"image file {source}: {e}") from None
        if self.writable:
            try:
                with atomic_write(cached) as tmp:
                    tmp.write_bytes(data)
            except DuchError:  # a read-only or full run folder: serve the thumbnail, just do not keep it
                self.writable = False
        return data

    def count(self) -> int:
        return sum(len(files) for _, _, files in os.walk(self.folder)) if self.folder.is_dir() else 0

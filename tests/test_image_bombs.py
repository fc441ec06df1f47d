"""Decompression bombs against every image reader: TIFFs and GeoTIFFs of a few KB declaring many samples per
pixel, many pages, or both (every strip pointing at one deflated strip), refused from their headers by the one
decoded-size rule (data/images.py), with the peak memory of the process measured; the same files uploaded to the
service get a 400 with one JSON line."""
from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
from PIL import Image

from duch.data.images import ImageLoadError, load_image, load_image_bytes, raster_to_rgb8

ROOT = Path(__file__).resolve().parents[1]
GEO_TAGS = {33550: (12, struct.pack("<3d", 1e-4, 1e-4, 0)),  # ModelPixelScale
            33922: (12, struct.pack("<6d", 0, 0, 0, 10.0, 50.0, 0)),  # ModelTiepoint
            34735: (3, struct.pack("<16H", 1, 1, 0, 3, 1024, 0, 1, 2, 1025, 0, 1, 1, 2048, 0, 1, 4326))}  # EPSG:4326


def tiff_bomb(width: int = 9000, height: int = 9000, samples: int = 8, pages: int = 1, rows: int = 64,
              tile: int = 0, geo: bool = False) -> bytes:
    """A little-endian TIFF of `pages` pages of width x height x samples zero bytes, deflated; every strip (of
    `rows` rows) or tile (`tile` a side) of every page points at the same compressed block, so the file stays
    small whatever it declares. `geo` adds GeoTIFF tags (EPSG:4326)."""
    block_width, block_height = (tile, tile) if tile else (width, rows)
    packer, row = zlib.compressobj(9), bytes(block_width * samples)
    block = b"".join(packer.compress(row) for _ in range(block_height)) + packer.flush()
    blocks = math.ceil(height / block_height) * (math.ceil(width / tile) if tile else 1)
    out = bytearray(b"II*\x00\x00\x00\x00\x00")

    def put(data: bytes) -> int:
        at = len(out)
        out.extend(data + b"\x00" * (len(data) % 2))
        return at

    def array(kind: int, values: list[int]) -> tuple[int, int, int]:
        """(type, count, value or offset) of a tag: values that fit in 4 bytes are held in the entry itself."""
        code = {3: "H", 4: "I"}[kind]
        packed = struct.pack(f"<{len(values)}{code}", *values)
        if len(packed) <= 4:
            return kind, len(values), struct.unpack("<I", packed.ljust(4, b"\x00"))[0]
        return kind, len(values), put(packed)

    block_at = put(block)
    tags = {256: array(4, [width]), 257: array(4, [height]), 258: array(3, [8] * samples), 259: array(3, [8]),
            262: array(3, [1]), 277: array(3, [samples]), 284: array(3, [1])}
    offsets, counts = array(4, [block_at] * blocks), array(4, [len(block)] * blocks)
    if tile:
        tags.update({322: array(4, [tile]), 323: array(4, [tile]), 324: offsets, 325: counts})
    else:
        tags.update({273: offsets, 278: array(4, [rows]), 279: counts})
    if samples > 1:
        tags[338] = array(3, [0] * (samples - 1))  # ExtraSamples: unspecified
    for tag, (kind, data) in (GEO_TAGS if geo else {}).items():
        tags[tag] = (kind, len(data) // {3: 2, 12: 8}[kind], put(data))
    entries = b"".join(struct.pack("<HHII", tag, *tags[tag]) for tag in sorted(tags))
    ifds = [put(struct.pack("<H", len(tags)) + entries + b"\x00" * 4) for _ in range(pages)]
    struct.pack_into("<I", out, 4, ifds[0])
    for at, following in zip(ifds, ifds[1:]):
        struct.pack_into("<I", out, at + 2 + 12 * len(tags), following)
    return bytes(out)


BOMBS = {f"{name}{'-geo' if geo else ''}.tif": dict(kw, geo=geo) for geo in (False, True) for name, kw in
         {"samples": dict(samples=8), "samples64": dict(samples=64, rows=8), "pages": dict(samples=1, pages=8),
          "both": dict(samples=4, pages=4)}.items()}


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bombs")
    for name, kw in BOMBS.items():
        (folder / name).write_bytes(tiff_bomb(**kw))
    return folder


def peak_in_child(code: str) -> dict:
    """Run `code` in a fresh interpreter on this checkout, after its imports, with the peak RSS reset; it sets
    `result`. Returns result plus `peak_mb`, the peak over the resting RSS (bench/common.py measures so)."""
    script = (
        "import json, sys, types\n"
        f"sys.modules['duch'] = types.ModuleType('duch'); sys.modules['duch'].__path__ = [{str(ROOT)!r}]\n"
        "from duch.bench.common import reset_peak_rss, rss_mb\n"
        "from duch.data.images import ImageLoadError, load_image, load_image_bytes\n"
        "from duch.data.scenes import TileOptions, read_scenes\n"
        "import numpy, PIL.Image, rasterio, tifffile\n"
        "resting = rss_mb(); reset_peak_rss()\n"
        f"{code}\n"
        "print(json.dumps(dict(result=result, peak_mb=rss_mb('VmHWM:') - resting)))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_few_kb_declaring_gigabytes(bombs):
    """The bombs are what the issue describes: small files whose headers declare 648 MB and more."""
    for name in BOMBS:
        with tifffile.TiffFile(bombs / name) as tif:
            declared = sum(math.prod(page.shape) for page in tif.pages)
            assert (bombs / name).stat().st_size < 40_000 and declared >= 648_000_000, name
            assert tif.pages.first.is_geotiff == name.endswith("-geo.tif")


def test_every_bomb_is_refused_from_its_header_in_bounded_memory(bombs):
    """Files (by suffix) and uploads (by magic bytes), plain TIFF and GeoTIFF, and a TIFF bomb named .png that
    PIL opens: each is one named refusal, and the process's peak stays far below what one would decode to."""
    (bombs / "renamed.png").write_bytes((bombs / "samples.tif").read_bytes())
    code = (f"folder, result = {str(bombs)!r}, {{}}\n"
            "import pathlib\n"
            "for path in sorted(pathlib.Path(folder).iterdir()):\n"
            "    for how, read in (('file', load_image), ('bytes', lambda p: load_image_bytes(p.read_bytes()))):\n"
            "        try:\n"
            "            read(path); result[f'{path.name} {how}'] = 'accepted'\n"
            "        except ImageLoadError as e:\n"
            "            result[f'{path.name} {how}'] = str(e)\n")
    measured = peak_in_child(code)
    reasons = measured["result"]
    assert len(reasons) == 2 * (len(BOMBS) + 1)
    for case, reason in reasons.items():
        if case == "renamed.png file":  # its name sends it to PIL, which reads no 8-sample TIFF (uploads: magic)
            assert reason == "not a recognised image (expected JPEG, PNG or TIFF)"
            continue
        assert reason.startswith("image too large (") and "\n" not in reason, (case, reason)
        assert "the limit against decompression bombs is 357913940 values" in reason, (case, reason)
    assert "9000 x 9000 pixels x 64 samples x 1 page = 5184000000 values" in reasons["samples64.tif file"]
    assert "its first 5 pages declare 405000000 values" in reasons["pages-geo.tif bytes"]
    assert measured["peak_mb"] < 300, measured


def tiled_scene(folder: Path) -> Path:
    """A GeoTIFF scene whose single 9008 x 9008 tile of 8 samples GDAL would decode whole: 649 MB."""
    folder.mkdir()
    (folder / "bomb.tif").write_bytes(tiff_bomb(9008, 9008, samples=8, tile=9008, geo=True))
    shutil.copy(ROOT / "tests/assets/1.tif", folder / "plain.tif")  # no CRS: allowed below
    return folder


def test_a_scene_whose_block_is_a_bomb_is_a_reject_and_a_striped_one_reads_in_windows(tmp_path):
    folder = tiled_scene(tmp_path / "scenes")
    (folder / "striped.tif").write_bytes(tiff_bomb(samples=8, pages=8, geo=True))  # strips: read row by row
    code = (f"dataset = read_scenes({str(folder)!r}, TileOptions(256, allow_ungeoreferenced=True))\n"
            "from duch.data.scenes import load_tile\n"
            "striped = [i for i in dataset.items if i.image == 'striped.tif']\n"
            "tile = numpy.asarray(load_tile(dataset.images_dir, striped[-1], 0.9))\n"
            "result = dict(rejects=[[r.id, r.reason] for r in dataset.rejects], scenes=len(dataset.scenes),\n"
            "              striped=len(striped), tile=[list(tile.shape), int(tile.max())])\n")
    measured = peak_in_child(code)
    result = measured["result"]
    assert result["rejects"] == [["bomb", "scene blocks too large (9008 x 9008 pixels x 8 samples = 649152512 "
                                          "values a block; the limit against decompression bombs is 357913940 "
                                          "values); write the scene in smaller tiles (e.g. gdal_translate -co "
                                          "TILED=YES)"]]
    assert result["scenes"] == 2 and result["striped"] == 36 * 36 and result["tile"] == [[256, 256, 3], 0]
    assert measured["peak_mb"] < 300, measured


def test_pages_count_unless_overviews_and_only_the_first_is_read(tmp_path, monkeypatch):
    """With the limit at 1000 pixels (4000 values), 20 x 20 RGB pages count 1200 values each: three fit, four do
    not; a reduced-resolution copy does not count. A multi-page file gives its first page, except single-band
    pages of one shape, which are a band-first raster (as tifffile writes one): bands 1-3, as before."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    rgb = np.random.default_rng(0).integers(0, 255, (4, 20, 20, 3), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "three.tif") as tif:
        for k in range(3):
            tif.write(rgb[k], photometric="rgb")
            tif.write(rgb[k, ::2, ::2], photometric="rgb", subfiletype=1)
    assert np.array_equal(np.asarray(load_image(tmp_path / "three.tif")), rgb[0])
    with tifffile.TiffWriter(tmp_path / "four.tif") as tif:
        for k in range(4):
            tif.write(rgb[k], photometric="rgb")
    with pytest.raises(ImageLoadError, match=r"its first 4 pages declare 4800 values; the limit against "
                                             r"decompression bombs is 4000 values, 1000 pixels of 4 samples"):
        load_image(tmp_path / "four.tif")
    bands = np.random.default_rng(1).integers(0, 4000, (5, 8, 9), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "bands.tif", bands)
    with tifffile.TiffFile(tmp_path / "bands.tif") as tif:
        assert len(tif.pages) == 5  # one page a band
    assert np.array_equal(np.asarray(load_image(tmp_path / "bands.tif")), raster_to_rgb8(bands))
    with pytest.raises(ImageLoadError, match=r"image too large \(20 x 20 pixels x 11 samples x 1 page = 4400"):
        load_image_bytes(tiff_bomb(20, 20, samples=11))
    with pytest.raises(ImageLoadError, match=r"image too large \(1100 pixels; the limit against decompression "
                                             r"bombs is 1000 pixels\)"):  # the pixel rule keeps its words
        load_image_bytes(tiff_bomb(55, 20, samples=1))


def test_a_tiff_of_more_pages_than_the_walk_takes_is_refused():
    with pytest.raises(ImageLoadError, match="image has more than 1024 pages"):
        load_image_bytes(tiff_bomb(4, 4, samples=1, pages=1100, rows=4))


def test_uploaded_bombs_get_a_400_with_one_json_line(encoded_run, bombs, tmp_path):
    from duch.pipeline.config import ServeConfig
    from duch.pipeline.serve.app import create_app

    from .serving import running

    run = tmp_path / "run"
    shutil.copytree(encoded_run, run)
    with running(create_app(ServeConfig(run=str(run), bits=16, device="cpu"))) as base:
        for name in ("samples.tif", "pages-geo.tif", "both.tif", "samples64-geo.tif"):
            response = httpx.post(f"{base}/api/search", timeout=30,
                                  files={"image": (name.replace(".tif", ".jpg"), (bombs / name).read_bytes())})
            assert (response.status_code, response.headers["content-type"]) == (400, "application/json"), name
            assert response.text.count("\n") <= 1 and "\n" not in response.json()["error"]
            assert response.json()["error"].startswith(f"uploaded file {name.replace('.tif', '.jpg')!r}: image "
                                                       "too large ("), response.json()
        assert httpx.post(f"{base}/api/search", json={"text": "a harbor", "k": 1}, timeout=30).status_code == 200

"""Scene tiling: tiles/s from a GeoTIFF scene against the same pixels from pre-cut JPEGs, and peak memory while
tiling scenes of growing size (flat expected).

    python bench/scene_tiling.py --ucm ../shared/datasets/ucm            # speed on real tiles + memory 2k vs 20k
    python bench/scene_tiling.py --skip-memory --ucm ../shared/datasets/ucm --tiles 64 --repeats 3   # quicker

Speed, side by side on the same pixels: --tiles UC Merced JPEGs (256 x 256) as they are (pre-cut tiles), and
their decoded pixels laid out as one georeferenced mosaic (UTM 11N, tiled 256, deflate). `read`: every tile
loaded as extract loads it (data.images.load_image against data.scenes.load_tile, checked equal), alternated,
median of --repeats passes; `extract`: the whole stage 1 on each (--encoder, no augmented views), tiles/s from
the manifest, alternated, median.

Memory: a synthetic scene of each --sizes side (3 bands of --dtype, a nodata edge, tiled 256, deflate) is
written by windows, then tiled in a fresh process: every scene listed (header, date, stretch) and every tile
read as an extract worker reads it (--memory-mode read), or the whole extract stage with a tiny open_clip model
of random weights (--memory-mode extract). The process's peak resident memory (VmHWM) is recorded.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for bench.common; duch is the installed package

from bench.common import save  # noqa: E402

TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                             "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
MERCED = (191533.216453, 4133833.923858)  # lon -120.48, lat 37.30 in UTM 11N (EPSG:32611)

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from bench.common import reset_peak_rss, rss_mb
import rasterio  # GDAL loaded before the baseline, as the first scene would load it
from duch.data.scenes import TileOptions, TileSkipped, load_tile, read_scenes
if {mode!r} == "extract":
    from duch.pipeline.config import ExtractConfig
    from duch.stages.extract import extract
baseline = rss_mb("VmRSS:")
reset_peak_rss()
t = time.perf_counter()
if {mode!r} == "read":
    dataset = read_scenes({scene!r}, TileOptions(256))
    listed = time.perf_counter() - t
    kept = 0
    for item in dataset.items:
        try:
            load_tile(dataset.images_dir, item, 0.9)
            kept += 1
        except TileSkipped:
            pass
    tiles = len(dataset.items)
else:
    manifest = extract(ExtractConfig(data={scene!r}, run={run!r}, image_encoder={encoder!r}, text_encoder=None,
                                     tile=256, image_views=0, device="cpu"), progress=False,
                       echo=lambda _: None).manifest
    listed, tiles, kept = None, manifest["counts"]["items"], manifest["counts"]["images"]
seconds = time.perf_counter() - t
print(json.dumps({{"seconds": seconds, "list_s": listed, "tiles": tiles, "kept": kept, "baseline_rss_mb": baseline,
                  "peak_rss_mb": rss_mb("VmHWM:")}}))
"""


def ucm_tiles(ucm: Path, n: int) -> list[Path]:
    """n UCM JPEGs of exactly 256 x 256, spread over the classes (every k-th file by image number)."""
    from PIL import Image

    files = sorted((ucm / "images").glob("*.jpg"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0)
    picked = []
    for path in files[::max(1, len(files) // (2 * n))]:
        with Image.open(path) as img:
            if img.size == (256, 256) and img.mode == "RGB":
                picked.append(path)
        if len(picked) == n:
            return picked
    raise SystemExit(f"{ucm}: found only {len(picked)} 256 x 256 RGB JPEGs of the {n} asked for")


def write_mosaic(tiles: list[Path], path: Path) -> list[np.ndarray]:
    """The tiles' decoded pixels in a square grid, one GeoTIFF; returns the pixels in reading order."""
    import rasterio
    from affine import Affine
    from PIL import Image

    cols = int(np.ceil(np.sqrt(len(tiles))))
    rows = int(np.ceil(len(tiles) / cols))
    pixels = [np.asarray(Image.open(p).convert("RGB")) for p in tiles]
    mosaic = np.zeros((rows * 256, cols * 256, 3), np.uint8)
    for n, px in enumerate(pixels):
        i, j = divmod(n, cols)
        mosaic[i * 256:(i + 1) * 256, j * 256:(j + 1) * 256] = px
    profile = dict(driver="GTiff", width=cols * 256, height=rows * 256, count=3, dtype="uint8", crs="EPSG:32611",
                   transform=Affine(0.3048, 0, MERCED[0], 0, -0.3048, MERCED[1]), tiled=True, blockxsize=256,
                   blockysize=256, compress="deflate", predictor=2)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(mosaic.transpose(2, 0, 1))
    return pixels


def write_synthetic(path: Path, side: int, dtype: str) -> None:
    """A side x side scene of 3 bands: smooth gradients with a per-block offset (so tiles differ, and deflate
    with horizontal differencing keeps the file small), and a nodata edge over the first 5% of the columns;
    written 256 rows at a time, as a scene too large for memory would be."""
    import rasterio
    from affine import Affine

    high = 255 if dtype == "uint8" else 4000
    profile = dict(driver="GTiff", width=side, height=side, count=3, dtype=dtype, crs="EPSG:32611", nodata=0,
                   transform=Affine(0.3048, 0, MERCED[0], 0, -0.3048, MERCED[1]), tiled=True, blockxsize=256,
                   blockysize=256, compress="deflate", predictor=2, BIGTIFF="IF_SAFER")
    edge = side // 20
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, side, 256):
            h = min(256, side - r)
            yy, xx = np.mgrid[r:r + h, 0:side]
            base = (xx // 3 + yy // 5 + (xx // 256) * 37 + (yy // 256) * 11) % high + 1
            bands = np.stack([base, (base * 3) % high + 1, (base * 7) % high + 1]).astype(dtype)
            bands[:, :, :edge] = 0
            dst.write(bands, window=rasterio.windows.Window(0, r, side, h))


def speed(args, scratch: Path) -> dict:
    from duch.data.images import load_image
    from duch.data.scenes import TileOptions, load_tile, read_scenes
    from duch.pipeline.config import ExtractConfig
    from duch.stages.extract import extract

    tiles = ucm_tiles(Path(args.ucm), args.tiles)
    jpegs = scratch / "jpegs"
    jpegs.mkdir()
    for p in tiles:
        shutil.copy(p, jpegs / p.name)
    (scratch / "scenes").mkdir()
    pixels = write_mosaic(tiles, scratch / "scenes" / "mosaic.tif")
    dataset = read_scenes(scratch / "scenes", TileOptions(256))
    items = dataset.items[:len(tiles)]
    for item, px in zip(items, pixels):  # the same pixels, or the comparison means nothing
        assert np.array_equal(np.asarray(load_tile(dataset.images_dir, item, 0.9)), px), item.id
    reads = {"jpeg": [], "scene": []}
    for _ in range(args.repeats):
        for kind in ("jpeg", "scene"):
            t = time.perf_counter()
            if kind == "jpeg":
                for p in tiles:
                    load_image(jpegs / p.name)
            else:
                for item in items:
                    load_tile(dataset.images_dir, item, 0.9)
            reads[kind].append(len(tiles) / (time.perf_counter() - t))
    runs = {"jpeg": [], "scene": []}
    for rep in range(args.extract_repeats):
        for kind in ("jpeg", "scene"):
            cfg = ExtractConfig(data=str(jpegs if kind == "jpeg" else scratch / "scenes"),
                                run=str(scratch / f"run-{kind}-{rep}"), image_encoder=args.encoder,
                                text_encoder=None, image_views=0, device=args.device,
                                tile=256 if kind == "scene" else 0)
            manifest = extract(cfg, progress=False, echo=lambda _: None).manifest
            assert manifest["counts"]["images"] == len(tiles)
            runs[kind].append(manifest["timings"]["images_per_s"])
            print(f"extract {kind}: {runs[kind][-1]:.1f} tiles/s", flush=True)
    med = {f"{k}_{kind}": statistics.median(v) for k, d in (("read", reads), ("extract", runs))
           for kind, v in d.items()}
    return {"tiles": len(tiles), "encoder": args.encoder, "device": args.device, "repeats": args.repeats,
            "extract_repeats": args.extract_repeats, "read_tiles_per_s": reads, "extract_tiles_per_s": runs,
            "median": {k: round(v, 1) for k, v in med.items()},
            "scene_over_jpeg": {"read": round(med["read_scene"] / med["read_jpeg"], 2),
                                "extract": round(med["extract_scene"] / med["extract_jpeg"], 2)}}


def memory(args, scratch: Path) -> dict:
    root = str(ROOT)
    clip = scratch / "tiny-clip.json"
    clip.write_text(json.dumps(TINY_CLIP))
    rows = []
    for side in (int(s) for s in args.sizes.split(",")):
        folder = scratch / f"scene-{side}"
        folder.mkdir()
        t = time.perf_counter()
        write_synthetic(folder / f"synthetic-{side}.tif", side, args.dtype)
        written = time.perf_counter() - t
        code = CHILD.format(root=root, mode=args.memory_mode, scene=str(folder), run=str(scratch / f"run-{side}"),
                            encoder=f"open_clip:{clip}:none")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"side": side, "mode": args.memory_mode, "dtype": args.dtype,
                     "file_mb": round((folder / f"synthetic-{side}.tif").stat().st_size / 1e6, 1),
                     "tiles": result["tiles"], "kept": result["kept"], "seconds": round(result["seconds"], 2),
                     "tiles_per_s": round(result["tiles"] / result["seconds"], 1),
                     "peak_rss_mb": round(result["peak_rss_mb"], 1),
                     "rss_after_imports_mb": round(result["baseline_rss_mb"], 1), "write_s": round(written, 1)})
        print(rows[-1], flush=True)
        shutil.rmtree(folder)
        shutil.rmtree(scratch / f"run-{side}", ignore_errors=True)
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    return {"rows": rows, "peak_ratio_largest_over_smallest": round(ratio, 3)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ucm", default=None, help="UCM-captions folder (images/*.jpg) for the speed part")
    parser.add_argument("--tiles", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--extract-repeats", type=int, default=3)
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="2000,20000")
    parser.add_argument("--dtype", default="uint16", choices=["uint8", "uint16"])
    parser.add_argument("--memory-mode", default="read", choices=["read", "extract"])
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--scratch", default=None)
    args = parser.parse_args(argv)
    if math.isqrt(args.tiles) ** 2 != args.tiles:  # the mosaic is a full square: every cell one of the tiles
        parser.error(f"--tiles {args.tiles}: give a square number (16, 64, 256...)")
    scratch = Path(tempfile.mkdtemp(prefix="duch-scenes-", dir=args.scratch))
    out = {}
    try:
        if args.ucm:
            out["speed"] = speed(args, scratch)
        if not args.skip_memory:
            out["memory"] = memory(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if "speed" in out:
        s = out["speed"]
        print(f"\n{s['tiles']} real UCM tiles, tiles/s (median): {'':>4}{'pre-cut JPEGs':>15}{'one GeoTIFF':>13}"
              f"{'ratio':>7}")
        for part in ("read", "extract"):
            print(f"{part + (' (' + s['encoder'] + ')' if part == 'extract' else ''):<42}"
                  f"{s['median'][part + '_jpeg']:>15}{s['median'][part + '_scene']:>13}{s['scene_over_jpeg'][part]:>7}")
    if "memory" in out:
        print(f"\n{'side':>7}{'tiles':>8}{'kept':>7}{'file MB':>9}{'tiles/s':>9}{'peak RSS MB':>13}"
              f"{'after imports':>15}")
        for r in out["memory"]["rows"]:
            print(f"{r['side']:>7}{r['tiles']:>8}{r['kept']:>7}{r['file_mb']:>9}{r['tiles_per_s']:>9}"
                  f"{r['peak_rss_mb']:>13}{r['rss_after_imports_mb']:>15}")
        print(f"peak RSS, largest over smallest: {out['memory']['peak_ratio_largest_over_smallest']}")
    path = save("scene_tiling", {"args": vars(args), **out})
    print(f"saved {path}")
    return out


if __name__ == "__main__":
    main()

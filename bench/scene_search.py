"""Searching scenes by place with a model trained on UCM: does "many airplanes parked at the airport" put the
airplane tile's footprint first?

    cp -r runs/ucm /tmp/ucm-model    # a finished UCM run (extract + train-hash); its copy is only read
    python bench/scene_search.py --model /tmp/ucm-model --ucm ../shared/datasets/ucm --mosaics 10

--mosaics scenes are made from real UC Merced tiles, each an 8 x 8 mosaic written as one GeoTIFF in UTM zone 11N
near Merced, California (each 2 km east of the last, one date each): one airplane tile the model never trained
on (from its split's query and database items; a different one in each mosaic) at a random place among 63 tiles
of the other 20 classes (runways included), drawn with the mosaic's seed; tiles not 256 x 256 are resized. The
scenes are extracted as tiles (`extract --tile 256`, the model's image encoder and views) and encoded with the
model (`encode-archive --archive`). For every code length, the query is searched
(1) within each mosaic by its lon/lat box (`--bbox ... --inside`, before the top k): the airplane tile's rank;
(2) over all the mosaics' tiles at once: how many of the top N are the N airplane tiles.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for bench.common; duch is the installed package

from bench.common import save  # noqa: E402

MERCED = (191533.216453, 4133833.923858)  # lon -120.48, lat 37.30 in UTM 11N (EPSG:32611)
FOOT = 0.3048
UCM_CLASSES = 21  # 100 images each, numbered by class: 1-100 agricultural, 101-200 airplane, ...
AIRPLANE = 1


def class_of(image_id: str) -> int:
    return (int(image_id) - 1) // 100


def make_mosaics(ucm: Path, model: Path, n: int, folder: Path) -> list[dict]:
    """n mosaics of 64 real tiles each, one unseen airplane tile in each; returns where each airplane tile is."""
    import rasterio
    from affine import Affine
    from PIL import Image

    split = json.loads((model / "train-hash" / "split.json").read_text())
    unseen = sorted(set(split["query"]) | set(split["database"]), key=int)
    airplanes = [i for i in unseen if class_of(i) == AIRPLANE]
    others = [str(i) for i in range(1, UCM_CLASSES * 100 + 1) if class_of(str(i)) != AIRPLANE]
    if n > len(airplanes):
        raise SystemExit(f"--mosaics {n}: the model's split leaves {len(airplanes)} unseen airplane tiles")
    planes = [airplanes[int(i)] for i in np.random.default_rng(0).choice(len(airplanes), n, replace=False)]
    mosaics = []
    for m, plane in enumerate(planes):
        rng = np.random.default_rng(m + 1)
        fill = [others[int(i)] for i in rng.choice(len(others), 63, replace=False)]
        where = int(rng.integers(64))
        ids = fill[:where] + [plane] + fill[where:]
        pixels = np.zeros((2048, 2048, 3), np.uint8)
        for k, image_id in enumerate(ids):
            tile = np.asarray(Image.open(ucm / "images" / f"{image_id}.jpg").convert("RGB").resize((256, 256)))
            i, j = divmod(k, 8)
            pixels[i * 256:(i + 1) * 256, j * 256:(j + 1) * 256] = tile
        west = MERCED[0] + m * 2000.0
        profile = dict(driver="GTiff", width=2048, height=2048, count=3, dtype="uint8", crs="EPSG:32611",
                       transform=Affine(FOOT, 0, west, 0, -FOOT, MERCED[1]), tiled=True, blockxsize=256,
                       blockysize=256, compress="deflate")
        name = f"mosaic-{m:02d}"
        with rasterio.open(folder / f"{name}.tif", "w", **profile) as dst:
            dst.write(pixels.transpose(2, 0, 1))
            dst.update_tags(ACQUISITIONDATETIME=f"2021-06-{m % 28 + 1:02d}")
        mosaics.append({"scene": name, "airplane_image": plane, "airplane_tile": f"{name}/{where // 8}_{where % 8}",
                        "bbox_utm": (west, MERCED[1] - 2048 * FOOT, west + 2048 * FOOT, MERCED[1])})
    return mosaics


def lonlat_box(bbox_utm, margin: float = 1e-6) -> str:
    """The lon/lat box that holds a mosaic's UTM rectangle (its corners' extremes, a hair wider)."""
    from duch.data.geo import to_lonlat

    x0, y0, x1, y1 = bbox_utm
    corners = to_lonlat("EPSG:32611", np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]))
    return ",".join(repr(float(v)) for v in (corners[:, 0].min() - margin, corners[:, 1].min() - margin,
                                             corners[:, 0].max() + margin, corners[:, 1].max() + margin))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a finished UCM run (extract and train-hash)")
    parser.add_argument("--ucm", required=True, help="UCM-captions folder (images/N.jpg)")
    parser.add_argument("--mosaics", type=int, default=10)
    parser.add_argument("--query", default="many airplanes parked at the airport")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scratch", default=None)
    parser.add_argument("--keep", action="store_true",
                        help="keep the scenes and their coded archive (printed at the end) for `duch serve`")
    args = parser.parse_args(argv)
    from duch.pipeline.config import EncodeConfig, ExtractConfig
    from duch.pipeline.retrieval.filters import PlaceFilter, search_places
    from duch.pipeline.retrieval.search import Index
    from duch.stages.encode_archive import encode_archive
    from duch.stages.extract import extract

    model = Path(args.model)
    trained = json.loads((model / "extract" / "manifest.json").read_text())["config"]
    scratch = Path(tempfile.mkdtemp(prefix="duch-scene-search-", dir=args.scratch))
    try:
        (scratch / "scenes").mkdir()
        mosaics = make_mosaics(Path(args.ucm), model, args.mosaics, scratch / "scenes")
        archive = scratch / "archive"
        t = time.perf_counter()
        extract(ExtractConfig(data=str(scratch / "scenes"), run=str(archive), image_encoder=trained["image_encoder"],
                              text_encoder=None, image_views=trained["image_views"], seed=trained["seed"],
                              tile=256, device=args.device), progress=False, echo=print)
        extract_s = time.perf_counter() - t
        t = time.perf_counter()
        encode_archive(EncodeConfig(run=str(model), archive=str(archive), device=args.device), progress=False,
                       echo=print)
        encode_s = time.perf_counter() - t
        rows = []
        bits_list = sorted(int(b) for b in json.loads((archive / "encode-archive" / "manifest.json").read_text())
                           ["models"])
        for bits in bits_list:
            index = Index.load(archive, bits=bits, device=args.device)
            ranks, matched = [], []
            for m in mosaics:
                hits, n = search_places(index, PlaceFilter.parse(bbox=lonlat_box(m["bbox_utm"]), inside=True),
                                        text=args.query, k=64)
                ranks.append([h.id for h in hits].index(m["airplane_tile"]) + 1)
                matched.append(n)
            planes = {m["airplane_tile"] for m in mosaics}
            top = [h.id for h in index.search(text=args.query, k=len(mosaics))]
            rows.append({"bits": bits, "airplane_rank_per_mosaic": ranks, "first": sum(r == 1 for r in ranks),
                         "median_rank": statistics.median(ranks), "matched_per_mosaic": sorted(set(matched)),
                         "airplanes_in_top_n_of_all": len(planes & set(top)), "n": len(mosaics)})
            print(rows[-1], flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nquery {args.query!r}: {len(mosaics)} mosaics of 64 real UCM tiles, one unseen airplane tile each")
    print(f"{'bits':>5}{'first in its mosaic':>21}{'median rank':>13}{'airplanes in top N of all':>27}")
    for r in rows:
        print(f"{r['bits']:>5}{r['first']:>15} / {r['n']:<3}{r['median_rank']:>13}"
              f"{r['airplanes_in_top_n_of_all']:>21} / {r['n']}")
    out = {"query": args.query, "mosaics": mosaics, "rows": rows, "extract_s": round(extract_s, 1),
           "encode_s": round(encode_s, 1), "model_extract": {k: trained[k] for k in ("image_encoder", "image_views")}}
    path = save("scene_search", out)
    print(f"saved {path}")
    if args.keep:
        print(f"kept the scenes in {scratch / 'scenes'} and their archive: duch serve --run {scratch / 'archive'}")
    return out


if __name__ == "__main__":
    main()

"""Change between dates on real UC Merced tiles: does `duch changes` put the replaced tiles first?

    cp -r runs/ucm /tmp/ucm-model    # a finished UCM run (extract + train-hash); its copy is only read
    flock /work/notes/bench.lock python bench/changes_quality.py --model /tmp/ucm-model --ucm ../shared/datasets/ucm
    flock /work/notes/bench.lock python bench/changes_quality.py --latency-only     # 1M synthetic tiles only

Two-date scenes: for each condition and each of --mosaics mosaics, an 8 x 8 mosaic of real UCM tiles the model
never trained on (its split's query and database items) written as a GeoTIFF in UTM zone 11N near Merced (each
mosaic 2 km east of the last) dated 2021-06-03; and the same place on the same grid dated 2022-06-03, where 4 to 8
tiles (drawn with the mosaic's seed) are replaced and every tile is re-augmented, so that "unchanged" is never
byte-identical: brightness x U(0.85, 1.15), a shift of up to 3 pixels each way (edges reflected), and a JPEG
re-encode at quality U(70, 90).
- condition `other`: a replaced tile becomes a tile of another class;
- condition `similar`: the replaced tiles are dense residential at the first date and medium residential at the
  second (UCM's two closest classes), among 56 unchanged tiles of any class.
Both dates are extracted as tiles (`extract --tile 256`, the model's image encoder and views) and coded by the
model (`encode-archive --archive --continuous`). For every code length and each mosaic: the pairs of that mosaic
(`changes --from 2021-06-03 --to 2022-06-03 --bbox MOSAIC --inside -k N`, N its replaced tiles), and the
precision of that top N (Hamming distance, equal distances by the cosine; and `--rerank`: by the cosine alone).
Baselines: chance (N / 64) and the mean absolute pixel difference of the two tiles (the same re-augmentation).
With several --model runs (train-hash --seed into copies of one extract) the mean over mosaics is reported per
model, and the mean over models with its 95 % t interval; with one model, the interval is over the mosaics.

Latency (--latency-n, default 1M): `find_changes` over N synthetic 64-bit tiles (half on each date, a grid of
78 m tiles near Merced; the second date on the same grid, or shifted a quarter tile), the whole archive and a box of
about 1 % of it, k = 20; median of --repeats after a warm-up. The whole archive's pairs are remembered per archive
generation (the first query pairs, the next ones only rank): both are timed.
"""
from __future__ import annotations

import argparse
import io
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
UTM11 = "EPSG:32611"
DATES = ("2021-06-03", "2022-06-03")
SIMILAR = ("denseresidential", "mediumresidential")


def unseen_by_class(ucm: Path, model: Path) -> dict[str, list[str]]:
    """The UCM images the model did not train on (its split's query and database), by class."""
    split = json.loads((model / "train-hash" / "split.json").read_text())
    unseen = set(map(str, split["query"])) | set(map(str, split["database"]))
    out: dict[str, list[str]] = {}
    for entry in json.loads((ucm / "dataset_ucm.json").read_text())["images"]:
        image_id = entry["filename"].rsplit(".", 1)[0]
        if image_id in unseen:
            out.setdefault(entry["classname"], []).append(entry["filename"])
    return out


def load(ucm: Path, name: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(ucm / "images" / name).convert("RGB").resize((256, 256)))


def reaugment(tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, a shift of a few pixels (edges reflected) and a JPEG re-encode: the same ground, seen again."""
    from PIL import Image

    out = np.clip(tile.astype(np.float32) * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8)
    dy, dx = (int(v) for v in rng.integers(-3, 4, 2))
    padded = np.pad(out, ((3, 3), (3, 3), (0, 0)), mode="reflect")
    out = padded[3 + dy:3 + dy + 256, 3 + dx:3 + dx + 256]
    buffer = io.BytesIO()
    Image.fromarray(out).save(buffer, "JPEG", quality=int(rng.integers(70, 91)))
    return np.asarray(Image.open(buffer).convert("RGB"))


def write_scene(path: Path, tiles: list[np.ndarray], west: float, date: str) -> None:
    import rasterio
    from affine import Affine

    pixels = np.zeros((2048, 2048, 3), np.uint8)
    for k, tile in enumerate(tiles):
        i, j = divmod(k, 8)
        pixels[i * 256:(i + 1) * 256, j * 256:(j + 1) * 256] = tile
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", width=2048, height=2048, count=3, dtype="uint8", crs=UTM11,
                   transform=Affine(FOOT, 0, west, 0, -FOOT, MERCED[1]), tiled=True, blockxsize=256, blockysize=256,
                   compress="deflate")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels.transpose(2, 0, 1))
        dst.update_tags(ACQUISITIONDATETIME=date)


def make_mosaics(ucm: Path, model: Path, n: int, folder: Path) -> list[dict]:
    """n mosaics per condition, each on two dates; returns, per mosaic, its place and replaced tiles' ids."""
    pools = unseen_by_class(ucm, model)
    classes = sorted(pools)
    mosaics = []
    for c, condition in enumerate(("other", "similar")):
        for m in range(n):
            rng = np.random.default_rng(1000 * c + m)
            changed = sorted(int(v) for v in rng.choice(64, int(rng.integers(4, 9)), replace=False))
            before_names, after_names = [], []
            for k in range(64):
                if condition == "similar" and k in changed:
                    before_names.append(str(rng.choice(pools[SIMILAR[0]])))
                    after_names.append(str(rng.choice(pools[SIMILAR[1]])))
                    continue
                cls = classes[int(rng.integers(len(classes)))]
                before_names.append(str(rng.choice(pools[cls])))
                if k in changed:
                    other = [x for x in classes if x != cls]
                    after_names.append(str(rng.choice(pools[other[int(rng.integers(len(other)))]])))
                else:
                    after_names.append(before_names[-1])
            before = [load(ucm, name) for name in before_names]
            after = [reaugment(load(ucm, name), rng) for name in after_names]
            name = f"{condition}-{m:02d}"
            west = MERCED[0] + (c * n + m) * 2000.0
            write_scene(folder / name / "2021.tif", before, west, DATES[0])
            write_scene(folder / name / "2022.tif", after, west, DATES[1])
            mae = [float(np.abs(b.astype(np.int16) - a.astype(np.int16)).mean()) for b, a in zip(before, after)]
            mosaics.append({"condition": condition, "scene": name, "changed": [f"{name}/2022/{k // 8}_{k % 8}"
                                                                                for k in changed],
                            "changed_positions": changed, "pixel_mae": mae,
                            "bbox_utm": (west, MERCED[1] - 2048 * FOOT, west + 2048 * FOOT, MERCED[1])})
    return mosaics


def lonlat_box(bbox_utm, margin: float = 1e-6) -> str:
    from duch.data.geo import to_lonlat

    x0, y0, x1, y1 = bbox_utm
    corners = to_lonlat(UTM11, np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]))
    return ",".join(repr(float(v)) for v in (corners[:, 0].min() - margin, corners[:, 1].min() - margin,
                                             corners[:, 0].max() + margin, corners[:, 1].max() + margin))


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95 % t interval); 0 for one value."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, float(stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / np.sqrt(len(values)))


def precisions(model_archive: Path, mosaics: list[dict], device: str) -> dict:
    """{bits: {condition: {"hamming": [precision per mosaic], "cosine": [...]}}} of one coded archive."""
    from duch.pipeline.retrieval.changes import find_changes
    from duch.pipeline.retrieval.filters import PlaceFilter
    from duch.pipeline.retrieval.search import Index

    manifest = json.loads((model_archive / "encode-archive" / "manifest.json").read_text())
    out: dict = {}
    for bits in sorted(int(b) for b in manifest["models"]):
        index = Index.load(model_archive, bits=bits, device=device)
        for m in mosaics:
            box = PlaceFilter.parse(bbox=lonlat_box(m["bbox_utm"]), inside=True)
            n = len(m["changed"])
            row = out.setdefault(bits, {}).setdefault(m["condition"], {"hamming": [], "cosine": []})
            for kind, rerank in (("hamming", False), ("cosine", True)):
                found = find_changes(index, *DATES, k=n, places=box, rerank=rerank)
                assert found.matched == 64 and not found.unpaired["from"] and not found.unpaired["to"], found.tiles
                row[kind].append(len({p.after.id for p in found.pairs} & set(m["changed"])) / n)
    return out


def latency(n: int, repeats: int) -> list[dict]:
    """find_changes over n synthetic tiles on two dates, through the library's own code path."""
    from types import SimpleNamespace

    from duch.data.geo import bounds_of, to_lonlat, window_corners
    from duch.pipeline.archive.segments import ArchiveCodes
    from duch.pipeline.formats.codes import CodeTable
    from duch.pipeline.retrieval.changes import PAIRS, find_changes
    from duch.pipeline.retrieval.filters import PlaceFilter

    rng = np.random.default_rng(0)
    half = n // 2
    rows_n = int(np.sqrt(half / 2))
    cols_n = half // rows_n
    half = rows_n * cols_n
    out = []
    for grid, shift in (("same grid", 0.0), ("shifted a quarter tile", 0.25)):
        windows = []
        for s in (0.0, shift):
            i, j = np.divmod(np.arange(half), cols_n)
            windows.append(np.stack([(j + s) * 256, i * 256, np.full(half, 256), np.full(half, 256)], axis=1))
        windows = np.concatenate(windows).astype(np.int64)
        transform = (FOOT, 0.0, MERCED[0], 0.0, -FOOT, MERCED[1])
        footprint = window_corners(transform, windows)
        lonlat = to_lonlat(UTM11, footprint)
        total = 2 * half
        meta = {"ids": np.array([f"t{k}" for k in range(total)], object), "path": np.array(["s.tif"] * total, object),
                "label": np.array([""] * total, object), "scene": np.array(["s"] * total, object),
                "window": windows, "crs": np.array([UTM11] * total, object), "footprint": footprint,
                "lonlat": lonlat, "bounds": bounds_of(lonlat), "date": np.array([DATES[0]] * half + [DATES[1]] * half,
                                                                              object),
                "bands": np.tile(np.array([1, 2, 3], np.int32), (total, 1)),
                "stretch": np.full((total, 2), np.nan)}
        table = CodeTable("image", rng.integers(0, 256, (total, 8), dtype=np.uint8),
                          rng.standard_normal((total, 64)).astype(np.float16), meta)
        archive = ArchiveCodes(None, [], {"image": table}, {"image": np.zeros(total, bool)},  # type: ignore[arg-type]
                               {"image": np.zeros(total, np.int64)}, [Path(".")])
        index = SimpleNamespace(tables={"image": table}, archive=archive)
        b = bounds_of(lonlat)
        lo, hi = b[:, :2].min(axis=0), b[:, 2:].max(axis=0)
        side = (hi - lo) * 0.1  # a tenth a side: about 1 % of the tiles
        box = PlaceFilter.parse(bbox=",".join(repr(float(v)) for v in (*lo, *(lo + side))))
        cases = (("whole archive, first query (pairing)", None, True), ("whole archive, pairs remembered", None, False),
                 ("box of ~1 %", box, False))
        for what, places, cold in cases:
            found = find_changes(index, *DATES, k=20, places=places)  # warm-up
            times = []
            for _ in range(repeats):
                if cold:
                    PAIRS.items.clear()
                t = time.perf_counter()
                found = find_changes(index, *DATES, k=20, places=places)
                times.append(time.perf_counter() - t)
            out.append({"tiles": total, "grid": grid, "query": what, "pairs": found.matched,
                        "median_ms": round(1000 * statistics.median(times), 1)})
            print(out[-1], flush=True)
        PAIRS.items.clear()
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[],
                        help="a finished UCM run (extract and train-hash); repeat for seeds of one extract")
    parser.add_argument("--ucm", default=None, help="UCM-captions folder (images/N.jpg, dataset_ucm.json)")
    parser.add_argument("--mosaics", type=int, default=10, help="per condition")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scratch", default=None)
    parser.add_argument("--work", default=None,
                        help="a folder kept between runs: its scenes and their extract are made once, then reused")
    parser.add_argument("--prepare", action="store_true", help="with --work: make the scenes and extract them, only")
    parser.add_argument("--keep", action="store_true", help="keep the scenes and the first model's coded archive")
    parser.add_argument("--latency-n", type=int, default=1_000_000, help="synthetic tiles (0: skip)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latency-only", action="store_true", help="only the latency (no model, no scenes)")
    args = parser.parse_args(argv)
    if args.latency_only:
        out = {"latency": latency(args.latency_n, args.repeats)}
        print(f"saved {save('changes_latency', out)}")
        return out
    from duch.pipeline.config import EncodeConfig, ExtractConfig
    from duch.stages.encode_archive import encode_archive
    from duch.stages.extract import extract

    models = [Path(m) for m in args.model]
    if not models or not args.ucm:
        parser.error("give --model and --ucm (or --latency-only)")
    trained = json.loads((models[0] / "extract" / "manifest.json").read_text())["config"]
    work = Path(args.work) if args.work else None
    scratch = Path(tempfile.mkdtemp(prefix="duch-changes-", dir=args.scratch))
    per_model = []
    try:
        base = work or scratch
        extracted = base / "extracted"
        if not (base / "mosaics.json").exists():
            mosaics = make_mosaics(Path(args.ucm), models[0], args.mosaics, base / "scenes")
            t = time.perf_counter()
            extract(ExtractConfig(data=str(base / "scenes"), run=str(extracted), image_encoder=trained["image_encoder"],
                                  text_encoder=None, image_views=trained["image_views"], seed=trained["seed"],
                                  tile=256, device=args.device), progress=False, echo=print)
            (base / "mosaics.json").write_text(json.dumps({"mosaics": mosaics,
                                                           "extract_s": time.perf_counter() - t}))
        made = json.loads((base / "mosaics.json").read_text())
        mosaics, extract_s = made["mosaics"], made["extract_s"]
        if len(mosaics) != 2 * args.mosaics:
            raise SystemExit(f"{base} holds {len(mosaics) // 2} mosaics a condition, not --mosaics {args.mosaics}")
        if args.prepare:
            return {}
        for k, model in enumerate(models):
            archive = scratch / f"archive-{k}"
            shutil.copytree(extracted, archive)  # each model codes its own copy of the tiles' features
            encode_archive(EncodeConfig(run=str(model), archive=str(archive), continuous=True, device=args.device),
                           progress=False, echo=print)
            per_model.append(precisions(archive, mosaics, args.device))
        latencies = latency(args.latency_n, args.repeats) if args.latency_n else []
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    rows = []
    for bits in sorted(per_model[0]):
        for condition in ("other", "similar"):
            row: dict = {"bits": bits, "condition": condition, "models": len(models)}
            for kind in ("hamming", "cosine"):
                runs = [r[bits][condition][kind] for r in per_model]
                values = [statistics.fmean(v) for v in runs] if len(runs) > 1 else runs[0]
                row[kind], row[f"{kind}_ci95"] = (round(v, 4) for v in interval(values))
                row[f"{kind}_per_model"] = [round(statistics.fmean(v), 4) for v in runs]
            rows.append(row)
    baselines = {}
    for condition in ("other", "similar"):
        chosen = [m for m in mosaics if m["condition"] == condition]
        pixel = [len(set(np.argsort(m["pixel_mae"])[::-1][:len(m["changed"])].tolist()) &
                     set(m["changed_positions"])) / len(m["changed"]) for m in chosen]
        baselines[condition] = {"chance": round(statistics.fmean(len(m["changed"]) / 64 for m in chosen), 4),
                                "pixel_mae": [round(v, 4) for v in interval(pixel)]}
    spread = "over models (seeds)" if len(models) > 1 else "over the mosaics (one model)"
    print(f"\nprecision of the top N (N = replaced tiles, 4-8 of 64), {args.mosaics} mosaics a condition, "
          f"mean and 95 % interval {spread}")
    print(f"{'bits':>5} {'condition':<9}{'Hamming':>17}{'by cosine':>17}")
    for r in rows:
        print(f"{r['bits']:>5} {r['condition']:<9}{r['hamming']:>10.3f} ± {r['hamming_ci95']:<5.3f}"
              f"{r['cosine']:>10.3f} ± {r['cosine_ci95']:.3f}")
    for condition, b in baselines.items():
        print(f"baseline {condition:<8} chance {b['chance']:.3f}  pixel difference {b['pixel_mae'][0]:.3f} ± "
              f"{b['pixel_mae'][1]:.3f}")
    out = {"mosaics_per_condition": args.mosaics, "dates": DATES, "models": [str(m) for m in models],
           "rows": rows, "baselines": baselines, "latency": latencies, "extract_s": round(extract_s, 1),
           "model_extract": {k: trained[k] for k in ("image_encoder", "image_views")},
           "mosaics": [{k: v for k, v in m.items() if k != "pixel_mae"} for m in mosaics]}
    path = save("changes_quality", out)
    print(f"saved {path}")
    if args.keep:
        print(f"kept {scratch}: duch serve --run {scratch / 'archive-0'}")
    return out


if __name__ == "__main__":
    main()

"""STAC catalogs of COGs over HTTP: bytes read, tiles/s against the same COGs read locally, memory in catalog size.

    flock /work/notes/bench.lock python bench/stac_http.py --ucm /work/shared/datasets/ucm

Scenes: --scenes distinct 2048 x 2048 mosaics of 64 real UC Merced tiles each (drawn with a fixed seed), given a
synthetic georeference (UTM 11N near Merced, 1-foot pixels), each written as three single-band COGs (rasterio's
COG driver, 256-pixel blocks, deflate, overviews), an item per scene with eo:bands red/green/blue. A real HTTP
server on 127.0.0.1 (tests/httpkit.py: Range requests, bytes counted), in a process of its own as a remote one
would be, serves them. Tiles are 256 pixels, read as extract's loader reads them (data.scenes.load_tile after
data.stac_scenes.read_catalog: listing, headers, every window); each pass on a thread of its own, so no GDAL
dataset or block cache is shared between passes.

1. bytes: the server's body bytes over the bytes of the files, (a) every tile of one scene's item, (b) with
   --bbox a lon/lat box over a tenth of that scene's area (its upper-left corner), (c) the whole catalog.
2. speed: tiles/s of the whole catalog over loopback HTTP against the same catalog with local paths, alternated,
   median of --repeats passes; with 1 and 4 reading threads (--threads), as extract's --workers share the work.
   With --extract-rounds N: the whole extract stage (the default image encoder, efficientnet-lite0, no views, no
   captions, the loader's default workers) on the same two catalogs, alternated, tiles/s from the manifests.
3. memory: peak resident memory (VmHWM over the baseline after imports) of a fresh process that lists and reads
   every tile of a catalog of 10 and of 100 items (the scenes' files repeated under new names, hard links).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
_LINKS = Path(tempfile.mkdtemp(prefix="duch-bench-"))
(_LINKS / "duch").symlink_to(ROOT, target_is_directory=True)  # this checkout's duch, not an installed one
sys.path[:0] = [str(_LINKS), str(ROOT)]

from bench.common import save  # noqa: E402

MERCED = (191533.216453, 4133833.923858)
FOOT = 0.3048
RGB = ("red", "green", "blue")

CHILD = """
import sys, time
sys.path[:0] = [{links!r}, {root!r}]
from bench.common import reset_peak_rss, rss_mb
import rasterio
from duch.data.scenes import TileOptions, load_tile
from duch.data.stac_scenes import read_catalog
baseline = rss_mb("VmRSS:")
reset_peak_rss()
t = time.perf_counter()
ds = read_catalog({url!r}, TileOptions(256))
n = 0
for item in ds.items:
    load_tile(ds.images_dir, item, 0.0)
    n += 1
print(json.dumps({{"items": len(ds.scenes), "tiles": n, "rejects": len(ds.rejects), "seconds": time.perf_counter() - t,
                  "baseline_mb": baseline, "peak_mb": rss_mb("VmHWM:")}}))
"""


def write_scenes(ucm: Path, n: int, folder: Path) -> list[str]:
    """n mosaics as three band COGs each: scene k's files folder/s{k}/B{0,1,2}.tif."""
    import rasterio
    from PIL import Image
    from rasterio.io import MemoryFile
    from rasterio.shutil import copy as rio_copy

    names = sorted(p.name for p in (ucm / "images").iterdir())
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        pixels = np.zeros((2048, 2048, 3), np.uint8)
        for i, name in enumerate(rng.choice(names, 64, replace=False)):
            tile = np.asarray(Image.open(ucm / "images" / name).convert("RGB").resize((256, 256)))
            pixels[(i // 8) * 256:(i // 8 + 1) * 256, (i % 8) * 256:(i % 8 + 1) * 256] = tile
        transform = rasterio.Affine(FOOT, 0, MERCED[0] + k * 2048 * FOOT, 0, -FOOT, MERCED[1])
        for b in range(3):
            path = folder / f"s{k}" / f"B{b}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            profile = dict(driver="GTiff", width=2048, height=2048, count=1, dtype="uint8", crs="EPSG:32611",
                           transform=transform)
            with MemoryFile() as mem:
                with mem.open(**profile) as dst:
                    dst.write(pixels[..., b][None])
                with mem.open() as src:
                    rio_copy(src, path, driver="COG", BLOCKSIZE=256, COMPRESS="DEFLATE")
        out.append(f"s{k}")
    return out


def item(item_id: str, folder: str, base: str, query: str = "") -> dict:
    return {"type": "Feature", "stac_version": "1.0.0", "id": item_id, "geometry": None, "links": [],
            "properties": {"datetime": "2021-06-03T00:00:00Z"},
            "assets": {f"B{b}": {"href": f"{base}{folder}/B{b}.tif{query}",
                                 "eo:bands": [{"name": f"B{b}", "common_name": c}]} for b, c in enumerate(RGB)}}


def write_catalog(path: Path, scenes: list[str], base: str, repeat: int = 1, query: str = "") -> Path:
    """An ItemCollection of the scenes (`repeat` times, under hard-linked names), hrefs under `base`. GDAL keeps
    what it downloaded per URL for the process's life: each pass's hrefs carry a `query` of their own (which the
    server ignores), so every pass reads cold."""
    items = []
    for r in range(repeat):
        for s in scenes:
            folder = s if r == 0 else f"{s}-r{r}"
            if r:
                (path.parent / folder).mkdir(exist_ok=True)
                for b in range(3):
                    target = path.parent / folder / f"B{b}.tif"
                    if not target.exists():
                        os.link(path.parent / s / f"B{b}.tif", target)
            items.append(item(f"{folder}", folder, base, query))
    path.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    return path


class ServerProcess:
    """tests/httpkit.py's server in a process of its own, as a remote server is: its work is not under this
    process's GIL; its counts read from its /__counts."""

    def __init__(self, root: Path):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "httpkit.py"), str(root)],
                                     stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()

    @property
    def sent(self) -> int:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/__counts") as r:
            return json.loads(r.read())["sent"]

    def reset_counts(self) -> None:
        import urllib.request

        urllib.request.urlopen(f"{self.url}/__reset").close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()


def read_all(location: str, threads: int = 1, **options) -> tuple[int, float]:
    """(tiles, seconds) of listing and reading every tile, on threads of their own (GDAL datasets are per
    thread): `threads` share the items out, as extract's loader workers (--workers) share its batches."""
    from concurrent.futures import ThreadPoolExecutor

    from duch.data.scenes import TileOptions, load_tile
    from duch.data.stac_scenes import read_catalog

    out = {}

    def work():
        t = time.perf_counter()
        ds = read_catalog(location, TileOptions(256, **options))
        assert not ds.rejects, ds.rejects
        by_item: dict = {}
        for it in ds.items:
            by_item.setdefault(it.tile.scene.name, []).append(it)
        shares = [[it for k, items in enumerate(by_item.values()) if k % threads == w for it in items]
                  for w in range(threads)]
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda share: [load_tile(ds.images_dir, it, 0.0) for it in share], shares))
        out["r"] = (len(ds.items), time.perf_counter() - t)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return out["r"]


def extract_speed(www: Path, scenes: list[str], base: str, local: Path, rounds: int) -> dict:
    """Tiles/s of whole extract stages (default image encoder) on the local and the HTTP catalog, alternated."""
    from duch.pipeline.config import ExtractConfig
    from duch.stages.extract import extract

    rates: dict[str, list[float]] = {"local": [], "http": []}
    for r in range(rounds):
        write_catalog(www / f"extract{r}.json", scenes, base, query=f"?pass=extract{r}")
        for name, where in (("local", str(local)), ("http", f"{base}extract{r}.json")):
            run = www.parent / f"run-{name}-{r}"
            cfg = ExtractConfig(data=where, run=str(run), text_encoder=None, tile=256, image_views=0, device="cpu")
            manifest = extract(cfg, progress=False, echo=lambda _: None).manifest
            rates[name].append(manifest["timings"]["images_per_s"])  # the images phase, encoder loaded
    speed = {k: statistics.median(v) for k, v in rates.items()}
    print(f"extract (efficientnet-lite0): local {speed['local']:.1f} tiles/s, http {speed['http']:.1f} tiles/s, "
          f"ratio {speed['http'] / speed['local']:.2f} (median of {rounds})")
    return {"tiles_per_s": speed, "rounds": rates, "http_over_local": speed["http"] / speed["local"]}


def tenth_box(k: int = 0) -> tuple[float, ...]:
    """A lon/lat box over the upper-left tenth of scene k's area (648 x 648 of its 2048 x 2048 pixels)."""
    from duch.data.geo import to_lonlat

    x0, y0 = MERCED[0] + k * 2048 * FOOT + 4 * FOOT, MERCED[1] - 4 * FOOT
    side = 640 * FOOT
    corners = to_lonlat("EPSG:32611", np.array([[x0, y0], [x0 + side, y0], [x0 + side, y0 - side], [x0, y0 - side]]))
    return (corners[:, 0].min(), corners[:, 1].min(), corners[:, 0].max(), corners[:, 1].max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ucm", type=Path, default=Path("/work/shared/datasets/ucm"))
    parser.add_argument("--scenes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-items", default="10,100")
    parser.add_argument("--threads", default="1,4", help="reading threads of the speed passes")
    parser.add_argument("--extract-rounds", type=int, default=1, help="whole-extract rounds (0: none)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="stac-bench-"))
    www = work / "www"
    scenes = write_scenes(args.ucm, args.scenes, www)
    file_bytes = {s: sum((www / s / f"B{b}.tif").stat().st_size for b in range(3)) for s in scenes}
    result: dict = {"scenes": args.scenes, "scene_pixels": 2048, "tile": 256, "cog_block": 256,
                    "file_bytes": sum(file_bytes.values())}
    with ServerProcess(www) as server:
        base = f"{server.url}/"
        for name, query in (("one", "?pass=a"), ("onebox", "?pass=b"), ("all", "?pass=c")):
            write_catalog(www / f"{name}.json", scenes[:1] if name.startswith("one") else scenes, base, query=query)
        local_all = write_catalog(www / "local.json", scenes, f"{www}/")
        # 1. bytes
        server.reset_counts()
        tiles_a, _ = read_all(f"{base}one.json")
        sent_a = server.sent - (www / "one.json").stat().st_size
        server.reset_counts()
        tiles_b, _ = read_all(f"{base}onebox.json", bbox=tenth_box())
        sent_b = server.sent - (www / "onebox.json").stat().st_size
        server.reset_counts()
        tiles_c, _ = read_all(f"{base}all.json")
        sent_c = server.sent - (www / "all.json").stat().st_size
        result["bytes"] = {
            "a_scene": {"tiles": tiles_a, "sent": sent_a, "of_files": sent_a / file_bytes[scenes[0]]},
            "b_bbox_tenth": {"tiles": tiles_b, "sent": sent_b, "of_files": sent_b / file_bytes[scenes[0]],
                             "bbox": tenth_box()},
            "c_catalog": {"tiles": tiles_c, "sent": sent_c, "of_files": sent_c / result["file_bytes"]},
            "b_over_a": sent_b / sent_a}
        print(f"bytes: scene {sent_a / 1e6:.2f} MB = {sent_a / file_bytes[scenes[0]]:.1%} of its files "
              f"({tiles_a} tiles); bbox tenth {sent_b / 1e6:.2f} MB = {sent_b / file_bytes[scenes[0]]:.1%} "
              f"({tiles_b} tiles), b/a {sent_b / sent_a:.1%}; catalog {sent_c / result['file_bytes']:.1%}")
        # 2. speed, alternated
        result["speed"] = {}
        for threads in [int(v) for v in args.threads.split(",")]:
            rates: dict[str, list[float]] = {"local": [], "http": []}
            for r in range(args.repeats):
                write_catalog(www / f"speed{r}.json", scenes, base, query=f"?pass=speed{threads}-{r}")
                for name, where in (("local", str(local_all)), ("http", f"{base}speed{r}.json")):
                    n, seconds = read_all(where, threads)
                    rates[name].append(n / seconds)
            speed = {k: statistics.median(v) for k, v in rates.items()}
            result["speed"][threads] = {"tiles_per_s": speed, "passes": rates,
                                        "http_over_local": speed["http"] / speed["local"]}
            print(f"speed, {threads} reading threads: local {speed['local']:.0f} tiles/s, http {speed['http']:.0f} "
                  f"tiles/s, ratio {speed['http'] / speed['local']:.2f} (median of {args.repeats})")
        if args.extract_rounds:
            result["extract"] = extract_speed(www, scenes, base, local_all, args.extract_rounds)
        # 3. memory
        memory = {}
        for n in [int(v) for v in args.memory_items.split(",")]:
            repeat = -(-n // len(scenes))
            catalog = write_catalog(www / f"mem{n}.json", scenes, base, repeat)
            doc = json.loads(catalog.read_text())
            doc["features"] = doc["features"][:n]
            catalog.write_text(json.dumps(doc))
            code = CHILD.format(links=str(_LINKS), root=str(ROOT), url=f"{base}mem{n}.json")
            done = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True,
                                  check=True)
            memory[n] = json.loads(done.stdout.strip().splitlines()[-1])
            m = memory[n]
            print(f"memory: {n} items, {m['tiles']} tiles in {m['seconds']:.1f} s: peak {m['peak_mb']:.0f} MB "
                  f"(baseline {m['baseline_mb']:.0f} MB, +{m['peak_mb'] - m['baseline_mb']:.0f} MB)")
        result["memory"] = memory
    print(f"saved {save('stac_http', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

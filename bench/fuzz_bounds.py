"""Time and peak memory of the worst inputs the fuzzers' rules bound (issue 24): a caption and a caption query of
50 million characters, caption JSON files at the size bound, and the largest images the readers accept or refuse;
and what reading captions by the rules costs. This checkout side by side with another (`--compare`, e.g. the
checkout before the rules) in one run.

    python bench/fuzz_bounds.py --run runs/ucm --compare ../before   # every case, both checkouts
    python bench/fuzz_bounds.py --cases images --chars 5000000  # quicker

Each case runs in a fresh process that imports `duch` from the checkout measured (a `duch` link to it first on
its path), imports
what the case needs, resets its peak resident memory (VmHWM) and then runs the case: the peak is the case's, not
the imports'. The caption case extracts one UC Merced tile whose caption JSON holds the long caption, with the
default encoders; the query case searches a finished run (`--run`, default runs/ucm; read only) by the
long text; the json cases read caption JSON files of `--json-bytes` (UCM-like, and one object per 4 bytes, the
densest a parser meets); the read case times read_dataset over a 60 MB UCM-like caption JSON (median of 5 reads a
process, the checkouts in 3 alternating rounds); the image cases load each file as extract does and make its two
augmented views.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import save  # noqa: E402

PRELUDE = """
import json, sys, time
sys.path.insert(0, {root!r})
from bench.common import reset_peak_rss, rss_mb
"""
RESET = """
baseline = rss_mb("VmRSS:")
reset_peak_rss()  # the peak from here on
t = time.perf_counter()
"""
REPORT = """
print("RESULT " + json.dumps({{"seconds": time.perf_counter() - t, "baseline_rss_mb": baseline,
                               "peak_rss_mb": rss_mb("VmHWM:"), **outcome}}))
"""
CAPTION = """
from duch.pipeline.config import ExtractConfig
from duch.stages.extract import extract
""" + RESET + """
result = extract(ExtractConfig(data={data!r}, run={run!r}, workers=0, device="cpu"), progress=False,
                 echo=lambda _: None)
outcome = {{"counts": result.manifest["counts"]}}
""" + REPORT
QUERY = """
from duch.pipeline.retrieval.search import Index
index = Index.load({run!r}, bits=64, device="cpu")
index.search(text="a warm-up query", k=5)  # encoders and heads loaded before the peak is reset
text = ("many planes parked near the terminal " * ({chars} // 37 + 1))[:{chars}]
""" + RESET + """
hits = index.search(text=text, k=5)
outcome = {{"hits": [h.id for h in hits]}}
""" + REPORT
JSON = """
from duch.data import DatasetError, read_dataset
""" + RESET + """
try:
    outcome = {{"outcome": f"accepted, {{len(read_dataset({path!r}).items):,}} items"}}
except DatasetError as e:
    outcome = {{"outcome": f"refused: {{str(e)[len({path!r}) + 2:][:80]}}"}}
""" + REPORT
READ = """
from duch.data import read_dataset
read_dataset({path!r})  # warm: the page cache and the imports
times = []
for _ in range(5):
    start = time.perf_counter()
    items = len(read_dataset({path!r}).items)
    times.append(time.perf_counter() - start)
""" + RESET + """
outcome = {{"median_read_s": sorted(times)[2], "reads_s": times, "outcome": f"{{items:,}} items"}}
""" + REPORT
IMAGE = """
from duch.data.augment import augment_image, view_rng
from duch.data.images import ImageLoadError, load_image
""" + RESET + """
try:
    img = load_image({path!r})
    views = [augment_image(img, view_rng(0, "x", v)) for v in (1, 2)]
    outcome = {{"outcome": f"accepted {{img.size[0]}} x {{img.size[1]}}"}}
except ImageLoadError as e:
    outcome = {{"outcome": f"refused: {{e}}"}}
""" + REPORT


def importable(checkout: Path) -> str:
    """A folder holding a `duch` link to `checkout`: first on a child's path, its `import duch` is that checkout."""
    links = Path(tempfile.mkdtemp(prefix="duch-checkout-"))
    (links / "duch").symlink_to(checkout.resolve(), target_is_directory=True)
    return str(links)


def run_case(checkout: Path, body: str, **values) -> dict:
    code = PRELUDE.format(root=str(ROOT)) + body.format(**values)
    env = {**os.environ, "PYTHONPATH": importable(checkout)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir(),
                         env=env)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:300]}


# ---------------------------------------------------------------------------------------------- inputs
def png(path: Path, width: int, height: int, depth: int = 8, colour: int = 2) -> None:
    """A PNG of uniform rows, written row by row (never held whole)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    channels = {0: 1, 2: 3, 6: 4}[colour]
    row = b"\0" + bytes(range(256)) * (width * channels * depth // 8 // 256 + 1)
    row = row[:1 + width * channels * depth // 8]
    packer = zlib.compressobj(6)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def tiff(path: Path, side: int, bands: int, dtype) -> None:
    """A tiled, deflated TIFF of `bands` bands, written tile by tile."""
    import tifffile

    ramp = np.add.outer(np.arange(512), np.arange(512))[:, :, None] + 97 * np.arange(bands)
    tile = (ramp % 4000).astype(dtype)  # varied values (a real stretch), compressible (a small file)
    per_side = (side + 511) // 512
    tifffile.imwrite(path, data=(tile for _ in range(per_side * per_side)), shape=(side, side, bands), dtype=dtype,
                     tile=(512, 512), compression="zlib", photometric="rgb" if bands >= 3 else "minisblack",
                     extrasamples=["unspecified"] * (bands - 3) if bands > 3 else None)


def jpeg_declaring(path: Path, width: int, height: int) -> None:
    """A real JPEG whose frame header declares another size, its data cut short."""
    data = bytearray((ROOT / "tests" / "assets" / "102.jpg").read_bytes())
    at = data.find(b"\xff\xc0")
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data[:len(data) // 2]))


def image_inputs(folder: Path) -> dict[str, Path]:
    """The largest images accepted (just under PIL's 89,478,485-pixel limit) and refusals from the header."""
    side = 9459  # 89,472,681 pixels
    made = {"png-rgb8-89mpx": folder / "rgb.png", "tiff-rgbn-uint16-89mpx": folder / "rgbn16.tif",
            "tiff-rgbn-float32-89mpx": folder / "rgbn32f.tif", "png-bomb-900mpx": folder / "bomb.png",
            "jpeg-declaring-65535x65535": folder / "huge.jpg"}
    png(made["png-rgb8-89mpx"], side, side)
    tiff(made["tiff-rgbn-uint16-89mpx"], side, 4, np.uint16)
    tiff(made["tiff-rgbn-float32-89mpx"], side, 4, np.float32)
    png(made["png-bomb-900mpx"], 30000, 30000, depth=1, colour=0)
    jpeg_declaring(made["jpeg-declaring-65535x65535"], 65535, 65535)
    return made


def json_inputs(folder: Path, size: int) -> dict[str, Path]:
    """Caption JSON files of `size` bytes: UCM-like entries (5 captions each), and the densest in objects
    ({"images": [{}, {}, ...]}, every 3 bytes an object, refused after parsing for lacking file names)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    entry = {"filename": "00001.tif", "split": "train", "classname": "airplane", "sentences": [
        {"raw": "many planes parked near the terminal of the airport", "tokens": ["many", "planes"]}] * 5}
    one = len(json.dumps({**entry, "filename": "00000000.tif"})) + 2  # with its ", "
    ucm, dense = folder / "ucm-like.json", folder / "dense.json"
    with open(ucm, "w") as f:
        f.write('{"images": [')
        f.write(", ".join(json.dumps({**entry, "filename": f"{i:08d}.tif"}) for i in range(size // one)))
        f.write("]}")
    dense.write_text('{"images": [' + ", ".join(["{}"] * (size // 4)) + "]}")
    return {f"caption JSON, UCM-like ({ucm.stat().st_size:,} bytes)": ucm,
            f"caption JSON, one object per 4 bytes ({dense.stat().st_size:,} bytes)": dense}


def ucm_like(paths: dict[str, Path]) -> Path:
    return next(path for case, path in paths.items() if "UCM-like" in case)


def caption_archive(folder: Path, chars: int) -> Path:
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "1.jpg").write_bytes((ROOT / "tests" / "assets" / "102.jpg").read_bytes())
    caption = ("many planes parked near the terminal " * (chars // 37 + 1))[:chars]
    (folder / "dataset.json").write_text(json.dumps({"images": [{"filename": "1.jpg", "sentences": [
        {"raw": caption}, {"raw": "a short caption"}]}]}))
    return folder / "dataset.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", type=Path, default=None, help="Another checkout measured the same way.")
    parser.add_argument("--cases", default="caption,query,read,json,images",
                        help="Any of caption, query, read, json, images.")
    parser.add_argument("--json-bytes", type=int, default=127 * 2**20, help="Size of the caption JSON files.")
    parser.add_argument("--chars", type=int, default=50_000_000, help="Length of the long caption and query.")
    parser.add_argument("--run", type=Path, default=Path("runs/ucm"), help="A finished run to search.")
    args = parser.parse_args()
    checkouts = {"this": ROOT, **({"compare": args.compare.resolve()} if args.compare else {})}
    cases = set(args.cases.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for name, checkout in checkouts.items():
            if "caption" in cases:
                data = caption_archive(scratch / f"caption-{name}", args.chars)
                rows.append({"case": f"extract, caption of {args.chars:,} characters", "checkout": name,
                             **run_case(checkout, CAPTION, data=str(data), run=str(scratch / f"run-{name}"))})
            if "query" in cases:
                rows.append({"case": f"search, query of {args.chars:,} characters", "checkout": name,
                             **run_case(checkout, QUERY, run=str(args.run), chars=args.chars)})
        if "read" in cases:  # what reading captions by the rules costs: the two checkouts in alternating rounds
            path = ucm_like(json_inputs(scratch / "read", 60 * 2**20))
            for round_ in range(3):
                for name, checkout in checkouts.items():
                    rows.append({"case": f"read_dataset, 60 MB caption JSON, round {round_ + 1}", "checkout": name,
                                 **run_case(checkout, READ, path=str(path))})
        if "json" in cases:
            for case, path in json_inputs(scratch / "json", args.json_bytes).items():
                for name, checkout in checkouts.items():
                    rows.append({"case": f"read_dataset, {case}", "checkout": name,
                                 **run_case(checkout, JSON, path=str(path))})
        if "images" in cases:
            inputs = image_inputs(scratch)
            for case, path in inputs.items():
                for name, checkout in checkouts.items():
                    rows.append({"case": f"load + 2 views, {case} ({path.stat().st_size:,} bytes)", "checkout": name,
                                 **run_case(checkout, IMAGE, path=str(path))})
    print(f"{'case':<72} {'checkout':<8} {'seconds':>8} {'peak MB':>8}  outcome")
    for row in rows:
        outcome = row.get("error") or row.get("outcome") or row.get("hits") or row.get("counts", {})
        if "median_read_s" in row:
            outcome = f"{outcome}, median of 5 reads {row['median_read_s']:.2f} s"
        if isinstance(outcome, dict):
            outcome = {k: outcome[k] for k in ("captions", "capped_captions", "truncated_captions") if k in outcome}
        print(f"{row['case']:<72} {row['checkout']:<8} {row.get('seconds', float('nan')):>8.2f} "
              f"{row.get('peak_rss_mb', float('nan')):>8.0f}  {str(outcome)[:70]}")
    saved = save("fuzz_bounds", {"chars": args.chars, "checkouts": {k: str(v) for k, v in checkouts.items()},
                                 "rows": rows})
    print(f"saved {saved}")


if __name__ == "__main__":
    main()

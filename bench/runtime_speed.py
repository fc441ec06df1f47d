"""The encoders' runtimes side by side (torch against ONNX Runtime) on this machine's CPU, in one run:

    flock /work/notes/bench.lock python bench/runtime_speed.py --images 210 --captions 2000

1. extract end to end (efficientnet-lite0, 2 augmented views, images only): images/s and the process's peak RSS,
   each runtime in its own process, alternated over `--rounds`; and ONNX with `--image-views 0` against 2.
2. minilm-l6 captions/s in process (the runtimes alternated), and the parity of both encoders on real tiles and
   captions (least cosine to torch).
3. `duch serve` on a small run coded by the default encoders: image uploads q/s at 4 clients and caption p50 at
   1 client, one server per runtime.
4. single-query search latency over 1M 64-bit codes (faiss IndexBinaryFlat) while a CPU-bound process competes:
   one OpenMP thread (what duch now asks for one query) against two (OpenMP's default on 2 cores).
Medians; prints a table and writes bench/results/runtime_speed-MACHINE-DATE.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import UCM, log, save, ucm_subset  # noqa: E402
from bench.serve_load import CAPTIONS, Server, json_request, measure, upload_request  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXTRACT = """
import json, sys, time
from duch.pipeline.config import ExtractConfig
from duch.stages.extract import extract
t = time.perf_counter()
r = extract(ExtractConfig(**json.loads(sys.argv[1])), progress=False, echo=lambda _: None)
peak = [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"timings": r.manifest["timings"], "wall_s": time.perf_counter() - t, "peak_rss_mb": peak}))
"""


def extract_once(data: Path, run: Path, runtime: str, views: int, text: bool = False) -> dict:
    cfg = {"data": str(data), "run": str(run), "runtime": runtime, "image_views": views, "device": "cpu",
           "text_encoder": "minilm-l6" if text else None}
    out = subprocess.run([sys.executable, "-c", EXTRACT, json.dumps(cfg)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def median(rows: list[dict], key: str) -> float:
    return float(np.median([r[key] if key in r else r["timings"][key] for r in rows]))


def bench_extract(data: Path, scratch: Path, rounds: int) -> dict:
    runs: dict[str, list[dict]] = {"torch": [], "onnx": [], "onnx_views0": []}
    for r in range(rounds):
        for name, runtime, views in (("torch", "torch", 2), ("onnx", "onnx", 2), ("onnx_views0", "onnx", 0)):
            row = extract_once(data, scratch / f"x-{name}-{r}", runtime, views)
            runs[name].append(row)
            log(f"  extract {name} round {r}: {row['timings']['images_per_s']:.1f} images/s, "
                f"peak RSS {row['peak_rss_mb']:.0f} MB")
    out = {name: {"images_per_s": median(rows, "images_per_s"), "peak_rss_mb": median(rows, "peak_rss_mb"),
                  "wall_s": median(rows, "wall_s"), "runs": rows} for name, rows in runs.items()}
    out["speedup_views2"] = out["onnx"]["images_per_s"] / out["torch"]["images_per_s"]
    return out


def bench_encoders(files: list[Path], captions: list[str], reps: int) -> dict:
    import torch

    from duch.data.images import load_image
    from duch.pipeline.compute.cluster import torch_threads
    from duch.pipeline.encoders import load_encoders, parse_spec

    with torch_threads(None):
        specs = {rt: (parse_spec("efficientnet-lite0", "image").with_runtime(rt, "cpu"),
                      parse_spec("minilm-l6", "text").with_runtime(rt, "cpu")) for rt in ("torch", "onnx")}
        loaded = {rt: load_encoders(*pair) for rt, pair in specs.items()}
        pixels = torch.stack([loaded["torch"][0].transform(load_image(f)) for f in files[:64]])
        emb = {rt: (enc[0].encode(pixels), enc[1].encode(captions)) for rt, enc in loaded.items()}
        cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b).min())  # noqa: E731
        rates: dict[str, list[float]] = {"torch": [], "onnx": []}
        for _ in range(reps):
            for rt, (_, text) in loaded.items():
                t = time.perf_counter()
                text.encode(captions)
                rates[rt].append(len(captions) / (time.perf_counter() - t))
    return {"captions": len(captions), "captions_per_s": {rt: float(np.median(v)) for rt, v in rates.items()},
            "captions_runs": rates, "parity_min_cosine": {"images (64 UCM tiles)": cos(emb["torch"][0], emb["onnx"][0]),
                                                          f"captions ({len(captions)} UCM)": cos(emb["torch"][1],
                                                                                                 emb["onnx"][1])}}


def coded_run(data: Path, run: Path) -> None:
    """A small run coded by the default encoders (onnx extract, short training): what the service serves."""
    cli = [sys.executable, str(ROOT / "cli.py")]
    extract_once(data, run, "onnx", 2, text=True)
    subprocess.run([*cli, "train-hash", "--run", str(run), "--bits", "64", "--epochs", "10", "--device", "cpu",
                    "--no-progress"], check=True, capture_output=True)
    subprocess.run([*cli, "encode-archive", "--run", str(run), "--device", "cpu", "--no-progress"], check=True,
                   capture_output=True)


def bench_serve(run: Path, files: list[Path], seconds: float, scratch: Path) -> dict:
    tiles = [(f.name, f.read_bytes()) for f in files[:64]]
    out = {}
    for runtime in ("torch", "onnx"):
        server = Server(str(run), 64, ["--device", "cpu", "--runtime", runtime], scratch / f"serve-{runtime}.log")
        port = server.port
        try:
            caption = lambda i, port=port: json_request(port, {"text": CAPTIONS[i % len(CAPTIONS)], "k": 20})  # noqa: E731
            image = lambda i, port=port: upload_request(port, *tiles[i % len(tiles)], 20)  # noqa: E731
            measure(server, caption, 1, 2)  # warm: the encoders load on the first query of each kind
            measure(server, image, 1, 2)
            images = measure(server, image, 4, seconds)
            captions = measure(server, caption, 1, seconds)
            out[runtime] = {"images_4_clients": images, "captions_1_client": captions, "rss_mb": server.rss_mb()}
            log(f"  serve {runtime}: images {images['qps']} q/s at 4 clients, caption p50 {captions['p50_ms']} ms")
        finally:
            server.stop()
    return out


def bench_search(n: int, queries: int) -> dict:
    from duch.pipeline.formats import faiss_index

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (n, 8), dtype=np.uint8)
    index = faiss_index.build(codes, "flat")
    probe = rng.integers(0, 256, (queries, 8), dtype=np.uint8)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # the competing CPU-bound process
    try:
        time.sleep(1)
        ms: dict[int, list[float]] = {1: [], 2: []}
        for q in range(queries):
            for threads in (1, 2):
                t = time.perf_counter()
                faiss_index.search(index, probe[q:q + 1], 10, threads=threads)
                ms[threads].append((time.perf_counter() - t) * 1000)
    finally:
        hog.kill()
        hog.wait()
    return {"codes": n, "bits": 64, "queries": queries, "competing": "one `while True: pass` process",
            **{f"threads_{t}": {"p50_ms": float(np.percentile(v, 50)), "p95_ms": float(np.percentile(v, 95))}
               for t, v in ms.items()}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=210, help="UCM tiles extracted (spread over the classes)")
    parser.add_argument("--captions", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2, help="extract runs per runtime, alternated")
    parser.add_argument("--reps", type=int, default=3, help="caption passes per runtime, alternated")
    parser.add_argument("--serve-seconds", type=float, default=10.0)
    parser.add_argument("--search-codes", type=int, default=1_000_000)
    parser.add_argument("--search-queries", type=int, default=300)
    parser.add_argument("--skip", default="", help="comma list of sections to leave out: extract,encoders,serve,search")
    args = parser.parse_args(argv)
    import duch

    home = Path(duch.__path__[0]).resolve()  # bench/serve_load.py may have aliased the package: no __file__
    if home != ROOT:
        raise SystemExit(f"duch imports from {home}, not this checkout {ROOT}: set PYTHONPATH")
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {"loadavg_at_start": os.getloadavg(), "args": vars(args),
                    "note": "shared 2-core machine: other sessions' work ran at the same time"}
    with tempfile.TemporaryDirectory(prefix="duch-runtime-bench-") as tmp:
        scratch = Path(tmp)
        data = ucm_subset(UCM, args.images, scratch / "data")
        files = sorted((data / "images").iterdir())
        entries = json.loads((UCM / "dataset_ucm.json").read_text())["images"]
        captions = [s["raw"] for e in entries for s in e["sentences"]][::5][:args.captions]
        extract_once(data, scratch / "warm", "onnx", 0)  # the exports made (once per machine) before timing
        if "extract" not in skip:
            log("extract (efficientnet-lite0, views on, images only) ...")
            result["extract"] = bench_extract(data, scratch, args.rounds)
        if "encoders" not in skip:
            log("encoders in process ...")
            result["encoders"] = bench_encoders(files, captions, args.reps)
        if "serve" not in skip:
            log("serve ...")
            coded_run(data, scratch / "served")
            result["serve"] = bench_serve(scratch / "served", files, args.serve_seconds, scratch)
        if "search" not in skip:
            log("search with a competing process ...")
            result["search"] = bench_search(args.search_codes, args.search_queries)
    result["loadavg_at_end"] = os.getloadavg()
    report(result)
    log(f"wrote {save('runtime_speed', result)}")
    return result


def report(r: dict) -> None:
    if "extract" in r:
        e = r["extract"]
        for name in ("torch", "onnx", "onnx_views0"):
            row = e[name]
            log(f"extract {name:12s} {row['images_per_s']:7.1f} images/s  peak RSS {row['peak_rss_mb']:6.0f} MB")
        log(f"extract onnx / torch (views on): {e['speedup_views2']:.2f}x")
    if "encoders" in r:
        c = r["encoders"]["captions_per_s"]
        log(f"captions/s torch {c['torch']:.0f}, onnx {c['onnx']:.0f} ({c['onnx'] / c['torch']:.2f}x); parity "
            f"{r['encoders']['parity_min_cosine']}")
    if "serve" in r:
        for rt, s in r["serve"].items():
            log(f"serve {rt:5s}: images {s['images_4_clients']['qps']} q/s (4 clients), caption p50 "
                f"{s['captions_1_client']['p50_ms']} ms (1 client)")
    if "search" in r:
        s = r["search"]
        log(f"search 1 query, competing process: 1 thread p50 {s['threads_1']['p50_ms']:.2f} ms p95 "
            f"{s['threads_1']['p95_ms']:.2f}; 2 threads p50 {s['threads_2']['p50_ms']:.2f} p95 "
            f"{s['threads_2']['p95_ms']:.2f}")


if __name__ == "__main__":
    main()

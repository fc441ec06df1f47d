"""encode-archive at scale: peak memory and speed on synthetic archives of growing size (flat memory expected).

    python bench/encode_memory.py                       # 100k and 1M items, 512-d, 64 bits
    python bench/encode_memory.py --sizes 10000,100000  # quicker

A small synthetic run (2000 items) trains a 64-bit model for one epoch; each archive size is then written as a
synthetic extract run with the same "encoder" and encoded by that model, in a fresh process whose peak resident
memory during encoding is recorded (VmHWM, reset after the imports). Archives are written under --scratch
(default a temporary folder; 1M x 512-d is about 1 GB) and removed afterwards.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import save  # noqa: E402
from bench.synthetic import make_extract_run  # noqa: E402

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from duch.pipeline.config import EncodeConfig
from duch.stages.encode_archive import encode_archive
import torch, h5py
from bench.common import reset_peak_rss, rss_mb
baseline = rss_mb("VmRSS:")
reset_peak_rss()
t = time.perf_counter()
encode_archive(EncodeConfig(run={model!r}, archive={archive!r}, device={device!r}), progress=False, echo=lambda _: None)
seconds = time.perf_counter() - t
print(json.dumps({{"seconds": seconds, "baseline_rss_mb": baseline, "peak_rss_mb": rss_mb("VmHWM:")}}))
"""


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--scratch", default=None)
    args = parser.parse_args(argv)
    from duch.pipeline.config import TrainConfig
    from duch.stages.train_hash import train_hash

    root = Path(__file__).resolve().parents[1]
    scratch = Path(tempfile.mkdtemp(prefix="duch-encode-", dir=args.scratch))
    rows = []
    try:
        model = scratch / "model"
        make_extract_run(model, 2000, args.dim, captions=2, views=1, seed=1)
        train_hash(TrainConfig(run=str(model), bits=(args.bits,), epochs=1, split="all", device=args.device),
                   progress=False, echo=lambda _: None)
        for n in (int(s) for s in args.sizes.split(",")):
            archive = scratch / f"archive-{n}"
            t = time.perf_counter()
            make_extract_run(archive, n, args.dim, seed=2)
            written = time.perf_counter() - t
            code = CHILD.format(root=str(root), model=str(model), archive=str(archive), device=args.device)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            size = (archive / "encode-archive" / f"codes-{args.bits}.h5").stat().st_size
            rows.append({"items": n, "encode_s": round(result["seconds"], 2),
                         "items_per_s": round(n / result["seconds"]), "peak_rss_mb": round(result["peak_rss_mb"]),
                         "rss_after_imports_mb": round(result["baseline_rss_mb"]),
                         "codes_file_mb": round(size / 1e6, 1), "write_synthetic_s": round(written, 1)})
            print(rows[-1], flush=True)
            shutil.rmtree(archive)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{'items':>10}{'encode s':>10}{'items/s':>10}{'peak RSS MB':>13}{'after imports':>15}{'codes MB':>10}")
    for r in rows:
        print(f"{r['items']:>10}{r['encode_s']:>10}{r['items_per_s']:>10}{r['peak_rss_mb']:>13}"
              f"{r['rss_after_imports_mb']:>15}{r['codes_file_mb']:>10}")
    path = save("encode_memory", {"dim": args.dim, "bits": args.bits, "rows": rows})
    print(f"saved {path}")
    return {"rows": rows}


if __name__ == "__main__":
    main()

"""A growing archive at scale: what `duch add` costs as the archive grows, and what segments cost search.

    python bench/archive_growth.py                            # add to 10k and 1M; search over 1, 10, 100 segments
    python bench/archive_growth.py --sizes 10000,100000 --segments 1,10 --new 200   # quicker

add: the existing archive (N items) is a synthetic extract run (random 16-d embeddings claiming the tiny open_clip
encoder below, 2 augmented views) coded by a real model; the `--new` added items are real UCM images extracted by
that encoder (a one-layer ViT with random weights: extraction is cheap, so what grows with N shows) and coded by
every trained code length, with the archive's flat faiss index taking them. Each timing is `add` on a fresh copy
of the archive, in this process after a warm-up; median of --runs. Target: time(1M) / time(10k) <= 1.5.

search: one 1M-item archive cut into 1, 10 and 100 segments of equal size (each coded by the same model, one
generation listing them), then single text-free queries (an archive item's own code, --id) at 64 bits through
Index.search, default backend (faiss over every segment) and --backend numpy (the memory-mapped files scanned
segment by segment); median of --queries. Target: 100 segments within 1.5x of one.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import UCM, save  # noqa: E402
from bench.synthetic import make_extract_run  # noqa: E402
from duch.pipeline.archive.encoding import encode_plan  # noqa: E402
from duch.pipeline.archive.generation import Generation, write_generation  # noqa: E402
from duch.pipeline.config import AddConfig, EncodeConfig, TrainConfig  # noqa: E402
from duch.pipeline.encoders import parse_spec  # noqa: E402
from duch.pipeline.retrieval.search import Index  # noqa: E402
from duch.pipeline.run.records import TrainRun  # noqa: E402
from duch.stages.add import add  # noqa: E402
from duch.stages.encode_archive import encode_archive  # noqa: E402
from duch.stages.train_hash import train_hash  # noqa: E402

TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                             "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
BITS = (64,)


def quiet(_):
    pass


def model_run(scratch: Path, spec: str, encoder: dict) -> Path:
    run = scratch / "model"
    make_extract_run(run, 2000, dim=16, captions=2, views=2, spec=spec, encoder=encoder)
    train_hash(TrainConfig(run=str(run), bits=BITS, epochs=1, hidden=256, split="all", device="cpu"),
               progress=False, echo=quiet)
    return run


def archive(scratch: Path, name: str, n: int, model: Path, spec: str, encoder: dict) -> Path:
    run = scratch / name
    make_extract_run(run, n, dim=16, captions=2, views=2, spec=spec, encoder=encoder, shard_size=65536)
    encode_archive(EncodeConfig(run=str(model), archive=str(run), index="flat", device="cpu"), progress=False,
                   echo=quiet)
    return run


def new_items(scratch: Path, n: int) -> Path:
    root = scratch / "new"
    (root / "images").mkdir(parents=True)
    entries = []
    for k in range(n):
        name = f"new_{k}.jpg"
        shutil.copy(UCM / "images" / f"{k % 2100 + 1}.jpg", root / "images" / name)
        entries.append({"filename": name, "sentences": [{"raw": f"an added scene {k}"}, {"raw": f"scene {k}"}]})
    (root / "dataset.json").write_text(json.dumps({"images": entries}))
    return root


def time_add(base: Path, data: Path, runs: int) -> list[float]:
    seconds = []
    for r in range(runs + 1):  # the first is a warm-up (imports, encoder load paths)
        copy = base.with_name(base.name + "-copy")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(base, copy)
        t = time.perf_counter()
        add(AddConfig(run=str(copy), data=str(data), device="cpu", workers=1), progress=False, echo=quiet)
        if r:
            seconds.append(time.perf_counter() - t)
        shutil.rmtree(copy)
    return seconds


def segmented(scratch: Path, n: int, parts: int, model: Path, spec: str, encoder: dict) -> Path:
    """An n-item archive whose generation lists `parts` segments of n / parts items each."""
    run = scratch / f"seg{parts}"
    size = n // parts
    make_extract_run(run, size, dim=16, views=2, spec=spec, encoder=encoder, shard_size=65536)
    model_run_ = TrainRun.read(model)

    def encode_run(model_run_, archive, cfg, force, progress, echo):
        folder, plan = encode_plan(model_run_, archive, cfg, force, progress, echo)
        return folder.run(plan, force, echo)

    cfg = EncodeConfig(run=str(model), archive=str(run), device="cpu")
    encode_run(model_run_, run, cfg, False, False, quiet)
    segments = ["."]
    for s in range(1, parts):
        folder = run / "segments" / f"{s:04d}"
        make_extract_run(folder, size, dim=16, views=2, spec=spec, encoder=encoder, shard_size=65536, seed=s,
                         first_id=s * size)
        encode_run(model_run_, folder, EncodeConfig(run=str(model), archive=str(folder), device="cpu"), False, False,
                   quiet)
        segments.append(f"segments/{s:04d}")
    write_generation(run, Generation(number=1, segments=tuple(segments)))
    return run


def time_search(run: Path, backend: str, queries: int) -> float:
    index = Index.load(run, bits=64, device="cpu", backend=backend, verify=False)
    n = len(index.tables["image"])
    ids = [str(i) for i in range(0, n, max(1, n // queries))][:queries]
    index.search(id=ids[0], k=10, modality="image")  # builds the backend
    seconds = []
    for item in ids:
        t = time.perf_counter()
        index.search(id=item, k=10, modality="image")
        seconds.append(time.perf_counter() - t)
    return statistics.median(seconds) * 1000


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--new", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--search-size", type=int, default=1_000_000)
    parser.add_argument("--segments", default="1,10,100")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--scratch", default=None)
    args = parser.parse_args(argv)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="duch-growth-"))
    result: dict = {"args": vars(args), "add": {}, "search_ms": {}}
    try:
        (scratch / "tiny-clip.json").write_text(json.dumps(TINY_CLIP))
        spec = f"open_clip:{scratch / 'tiny-clip.json'}:none"
        encoder = parse_spec(spec, "image").fingerprint()
        model = model_run(scratch, spec, encoder)
        data = new_items(scratch, args.new)
        for n in map(int, args.sizes.split(",")):
            base = archive(scratch, f"archive{n}", n, model, spec, encoder)
            seconds = time_add(base, data, args.runs)
            result["add"][str(n)] = {"seconds": seconds, "median_s": statistics.median(seconds)}
            print(f"add {args.new} items to {n:>9,}: median {statistics.median(seconds):.2f} s {seconds}", flush=True)
            shutil.rmtree(base)
        sizes = list(result["add"])
        if len(sizes) > 1:
            result["add_ratio_largest_to_smallest"] = (result["add"][sizes[-1]]["median_s"]
                                                       / result["add"][sizes[0]]["median_s"])
        for parts in map(int, args.segments.split(",")):
            run = segmented(scratch, args.search_size, parts, model, spec, encoder)
            result["search_ms"][str(parts)] = {b: time_search(run, b, args.queries) for b in ("auto", "numpy")}
            print(f"search over {parts:>3} segments: {result['search_ms'][str(parts)]}", flush=True)
            shutil.rmtree(run)
        one = result["search_ms"].get("1")
        if one:
            result["search_ratio_to_one_segment"] = {p: {b: v[b] / one[b] for b in v}
                                                    for p, v in result["search_ms"].items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps({k: v for k, v in result.items() if k != "args"}, indent=1))
    print(f"saved {save('archive_growth', result)}")
    return result


if __name__ == "__main__":
    main()

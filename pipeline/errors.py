"""Errors a user can fix, and how each front end spells the parameters they name.

The library names a parameter in a message by its own Python name in backticks ("`rerank_top` needs the
continuous outputs"). `str(error)` keeps that name, as a Python caller wrote it; the CLI shows the option
(`--rerank`) and the service the JSON field (`rerank`), each through `spelled`, from the one table below.
"""
from __future__ import annotations

import re

FRONTS = ("python", "cli", "api")


class DuchError(Exception):
    """An error a user can fix; the CLI prints it on one line (exit code 2), the service as one JSON line."""


# Every parameter the library names in a message, by its Python name: (CLI option, service field; None where
# the service has no such field and keeps the Python name). A backticked word not listed here is left as it is.
SPELLINGS: dict[str, tuple[str, str | None]] = {
    "rerank_top": ("--rerank", "rerank"),
    "item_id": ("--id", "id"),
    "id": ("--id", "id"),
    "text": ("--text", "text"),
    "image": ("--image", "image"),
    "k": ("--k", "k"),
    "bits": ("--bits", None),
    "backend": ("--backend", None),
    "modality": ("--modality", "modality"),
    "ties": ("--ties", "ties"),
    "bbox": ("--bbox", "bbox"),
    "inside": ("--inside", "inside"),
    "date_from": ("--date-from", "date_from"),
    "date_to": ("--date-to", "date_to"),
    "need_places": ("--geojson", None),
    "force": ("--force", None),
    "image_encoder": ("--image-encoder", None),
    "text_encoder": ("--text-encoder", None),
    "continuous": ("--continuous", None),
    "device": ("--device", None),
    "verify": ("--no-verify", None),
    # The stages' settings (pipeline/config, and data/, compute/, embed/ naming them), by command.
    "data": ("--data", None),  # extract, add
    "images": ("--images", None),
    "image_views": ("--image-views", None),
    "seed": ("--seed", None),
    "shard_size": ("--shard-size", None),
    "dtype": ("--dtype", None),
    "batch_size": ("--batch-size", None),
    "decode": ("--decode", None),
    "tile": ("--tile", None),
    "stride": ("--stride", None),
    "bands": ("--bands", None),
    "min_valid": ("--min-valid", None),
    "date": ("--date", None),
    "allow_ungeoreferenced": ("--allow-ungeoreferenced", None),
    "scheduler": ("--scheduler", None),
    "threads": ("--threads", None),
    "recipe": ("--recipe", None),  # train-hash
    "split": ("--split", None),
    "epochs": ("--epochs", None),
    "hidden": ("--hidden", None),
    "tau": ("--tau", None),
    "precision": ("--precision", None),
    "reference_quirks": ("--reference-quirks", None),
    "checkpoint_every": ("--checkpoint-every", None),
    "overrides": ("--set", None),
    "index": ("--index", None),  # encode-archive
    "ids": ("ID ... or --ids FILE", None),  # remove
    "small": ("--small", None),  # compact
    "rerank": ("--rerank", None),  # evaluate
    "port": ("--port", None),  # serve
    "timeout": ("--timeout", None),
    "max_upload_mb": ("--max-upload-mb", None),
    "max_json_kb": ("--max-json-kb", None),
    "header_timeout": ("--header-timeout", None),
    "body_timeout": ("--body-timeout", None),
    "allowed_hosts": ("--allowed-host", None),
    "max_in_flight": ("--max-in-flight", None),
    "max_batch": ("--max-batch", None),
    "max_image_batch": ("--max-image-batch", None),
    "basemap": ("--basemap", None),
    "run": ("--run", None),  # every command that writes a run
    "wait": ("--wait", None),
    "lr": ("--set lr=", None),
    "runtime": ("--runtime", None),  # the encoders' runtime (extract, add, search, serve)
    # extract from STAC catalogs, declared fill (issue 30; bbox, date_from, date_to are spelled above)
    "nodata": ("--nodata", None),
    "assets": ("--assets", None),
    "max_cloud": ("--max-cloud", None),
    # duch export
    "to": ("--to", None),
    "to_sql": ("--to-sql", None),
    "include": ("--with", None),
    "integer": ("--integer", None),
    "table": ("--table", None),
    "replace": ("--replace", None),
    "row_group": ("--row-group", None),
    # refine with examples and `near` (issue 32, retrieval/refine.py, retrieval/near.py)
    "positives": ("--positive", "positives"),
    "negatives": ("--negative", "negatives"),
    "exclude_marked": ("--exclude-marked", "exclude_marked"),
    "rocchio": ("--rocchio", "rocchio"),
    "near": ("--near", "near"),
    # changes between dates (duch changes, /api/changes)
    "from_date": ("--from", "from"),
    "to_date": ("--to", "to"),
    "min_iou": ("--min-iou", "min_iou"),
    "refusal_burst": ("--refusal-burst", None),  # serve: fairness between clients (issue 31)
    "refusal_rate": ("--refusal-rate", None),
    "max_per_client": ("--max-per-client", None),
}

_NAME = re.compile(r"`([a-z][a-z0-9_]*)`")


def spell(name: str, front: str) -> str:
    """One listed parameter's name as `front` ("python", "cli" or "api") spells it."""
    cli, api = SPELLINGS[name]
    return cli if front == "cli" else (api or name) if front == "api" else name


def spelled(message: str, front: str) -> str:
    """A library message with every listed `parameter` in `front`'s spelling (its backticks dropped)."""
    if front not in FRONTS:
        raise ValueError(f"front must be one of {', '.join(FRONTS)}, got {front!r}")
    return _NAME.sub(lambda m: spell(m.group(1), front) if m.group(1) in SPELLINGS else m.group(0), message)

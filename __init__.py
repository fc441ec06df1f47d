"""duch: unsupervised contrastive hashing (DUCH) for cross-modal retrieval in remote-sensing archives.

The Python API in one place; each name is imported on first use, so `import duch.data` (or the CLI) does not pay
for torch and the stages:

    import duch
    duch.extract(duch.ExtractConfig(data="archive/", run="runs/a"))
    index = duch.Index.load("runs/a", bits=64)
"""
from __future__ import annotations

import importlib

# name -> the module that defines it
_WHERE = {
    "extract": "duch.stages.extract",
    "train_hash": "duch.stages.train_hash",
    "encode_archive": "duch.stages.encode_archive",
    "evaluate": "duch.stages.evaluate",
    "add": "duch.stages.add",
    "remove": "duch.stages.remove",
    "compact": "duch.stages.compact",
    "Index": "duch.pipeline.retrieval.search",
    "find_changes": "duch.pipeline.retrieval.changes",
    "load_features": "duch.pipeline.formats.features",
    "ExtractConfig": "duch.pipeline.config",
    "TrainConfig": "duch.pipeline.config",
    "EncodeConfig": "duch.pipeline.config",
    "EvaluateConfig": "duch.pipeline.config",
    "AddConfig": "duch.pipeline.config",
    "RemoveConfig": "duch.pipeline.config",
    "CompactConfig": "duch.pipeline.config",
    "ServeConfig": "duch.pipeline.config",
    "DuchError": "duch.pipeline",
    "DatasetError": "duch.data",
    "export": "duch.stages.export",  # duch export
    "ExportConfig": "duch.pipeline.config.export",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'duch' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

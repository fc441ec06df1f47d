"""Stage 3's settings: which model codes which archive, what else to store, and how the work runs."""
from __future__ import annotations

from dataclasses import dataclass

from duch.pipeline import DuchError
from duch.pipeline.config.fields import check_cluster


@dataclass
class EncodeConfig:
    """Stage 3: codes for every item of an archive (an extract run) from a trained train-hash run."""

    run: str  # run directory holding the trained train-hash stage
    archive: str | None = None  # run directory of the archive's extract stage; None: `run` itself
    bits: tuple[int, ...] | None = None  # None: every trained code length
    continuous: bool = False  # also store the heads' float16 outputs, for `search` re-ranking
    index: str | None = None  # also write a faiss index per code length: "flat", "ivf" or "hnsw"
    device: str = "auto"
    batch_size: int = 8192
    scheduler: str = "none"  # as for extract: one task per archive shard, here or on a dask cluster
    threads: int | None = None  # torch threads per encoding process, as for extract

    RUNTIME_FIELDS = ("device", "batch_size", "scheduler", "threads")

    def validate(self) -> None:
        if self.batch_size < 1:
            raise DuchError(f"`batch_size` must be at least 1, got {self.batch_size}")
        for k in self.bits or ():
            if k <= 0 or k % 8:
                raise DuchError(f"`bits` {k}: code lengths are positive multiples of 8")
        if self.index not in (None, "flat", "ivf", "hnsw"):
            raise DuchError(f"`index` must be flat, ivf or hnsw, got {self.index!r}")
        check_cluster(self.scheduler, self.threads)

"""The evaluate stage's settings."""
from __future__ import annotations

from dataclasses import dataclass

from duch.pipeline import DuchError


@dataclass
class EvaluateConfig:
    """Retrieval metrics of a run's codes on its held-out split."""

    run: str  # run directory with train-hash and encode-archive stages
    bits: tuple[int, ...] | None = None  # None: every encoded code length
    k: int = 20  # mAP@K
    rerank: int = 100  # Hamming shortlist re-ranked with the continuous outputs (when stored); 0: off

    RUNTIME_FIELDS = ()

    def validate(self) -> None:
        if self.k < 1:
            raise DuchError(f"`k` must be at least 1, got {self.k}")
        if self.rerank < 0:
            raise DuchError(f"`rerank` must be 0 (off) or a shortlist size, got {self.rerank}")

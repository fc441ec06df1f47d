"""Stage configs as dataclasses, and the fingerprint that says whether two runs would write the same outputs."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

from data.augment import ImageAugment, TextAugment
from pipeline.encoders import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER


@dataclass
class ExtractConfig:
    data: str  # annotation file (.json/.jsonl/.csv) or folder
    run: str  # run directory; the stage writes into RUN/extract
    images: str | None = None  # images folder, when not beside the annotation
    image_encoder: str = DEFAULT_IMAGE_ENCODER
    text_encoder: str | None = DEFAULT_TEXT_ENCODER  # None: images only
    image_views: int = 2  # augmented views per image, for DUCH's intra-modal term
    seed: int = 0
    shard_size: int = 4096  # items (images, or captions) per shard
    dtype: str = "float16"
    image_augment: ImageAugment = field(default_factory=ImageAugment)
    text_augment: TextAugment = field(default_factory=TextAugment)
    # How the work runs; these never change what is written.
    device: str = "auto"
    batch_size: int = 64
    text_batch_size: int = 512
    workers: int | None = None  # DataLoader worker processes; None: one per spare core, at most 8

    RUNTIME_FIELDS = ("device", "batch_size", "text_batch_size", "workers", "run")

    def validate(self) -> None:
        from pipeline import DuchError

        if self.image_views < 0:
            raise DuchError(f"--image-views must be 0 or more, got {self.image_views}")
        if self.shard_size < 1:
            raise DuchError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.batch_size < 1 or self.text_batch_size < 1:
            raise DuchError("batch sizes must be at least 1")
        if self.dtype not in ("float16", "float32"):
            raise DuchError(f"--dtype must be float16 or float32, got {self.dtype!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise DuchError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")

    def resolved_workers(self) -> int:
        if self.workers is not None:
            return max(0, self.workers)
        return min(8, max(1, (os.cpu_count() or 1) - 1))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        return out

    def output_settings(self) -> dict:
        """The fields that decide the bytes written: the basis of the stage's fingerprint."""
        out = self.to_dict()
        for name in self.RUNTIME_FIELDS:
            out.pop(name, None)
        # Where the data lives is an input, fingerprinted by content, not by path.
        out.pop("data", None)
        out.pop("images", None)
        return out


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()

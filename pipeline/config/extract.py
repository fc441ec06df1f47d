"""Stage 1's settings: where the archive is, which encoders, how many augmented views, and how the work runs."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from duch.data.augment import ImageAugment, TextAugment
from duch.pipeline import DuchError
from duch.pipeline.config.fields import check_scheduler, output_settings
from duch.pipeline.encoders import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER


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
    # Image decoding: "gpu" JPEGs in batches with nvJPEG, resized in batches on the GPU; "cpu" PIL, image by
    # image, in worker processes; "auto" gpu on a CUDA device when the archive is mostly JPEG and there are no
    # augmented views. Both give the same embeddings within float16 rounding, so it is no output setting.
    decode: str = "auto"
    # Where the shards are made: "none" (this process), "local[:N]" (a dask LocalCluster of N worker processes)
    # or the address of a running dask scheduler, tcp://host:8786. Shards are equal either way.
    scheduler: str = "none"
    # Torch threads per encoding process; None: torch's default in-process, the cores shared out on a local
    # cluster. CPU float32 matmuls may sum in another order with another thread count (a last-bit difference
    # in a few values), so runs compared bit for bit use the same count.
    threads: int | None = None

    RUNTIME_FIELDS = ("device", "batch_size", "text_batch_size", "workers", "decode", "run", "scheduler", "threads")

    def __post_init__(self):
        # The augmentations as a manifest records them (dicts, lists for tuples): ExtractConfig(**manifest["config"])
        # rebuilds the run's config.
        if isinstance(self.image_augment, dict):
            self.image_augment = ImageAugment.from_record(self.image_augment)
        if isinstance(self.text_augment, dict):
            self.text_augment = TextAugment(**self.text_augment)

    def validate(self) -> None:
        if self.seed < 0:  # it seeds numpy's generators of the augmented views, which take no negative seed
            raise DuchError(f"--seed must be 0 or more, got {self.seed}")
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
        if self.decode not in ("auto", "gpu", "cpu"):
            raise DuchError(f"--decode must be auto, gpu or cpu, got {self.decode!r}")
        check_scheduler(self.scheduler)
        if self.threads is not None and self.threads < 1:
            raise DuchError(f"--threads must be at least 1, got {self.threads}")

    def resolved_workers(self) -> int:
        if self.workers is not None:
            return max(0, self.workers)
        return min(8, max(1, (os.cpu_count() or 1) - 1))

    def output_settings(self) -> dict:
        # Where the data lives is an input, fingerprinted by content, not by path.
        return output_settings(self, ("data", "images"))

"""Settings of the commands that change an encoded archive in place: add, remove, compact."""
from __future__ import annotations

from dataclasses import dataclass

from duch.pipeline import DuchError
from duch.pipeline.config.fields import check_cluster, check_device
from duch.pipeline.encoders.runtime import check_runtime


@dataclass
class AddConfig:
    """New items for an encoded archive, extracted and coded as its own were (the run's recorded settings)."""

    run: str  # a run with a finished encode-archive stage (its own model's, or `--archive` of another run's)
    data: str  # the new items: the same forms as extract's --data
    images: str | None = None  # images folder, when not beside the annotation
    replace: bool = False  # items already in the archive whose file changed are coded again (else refused)
    # How the work runs, as for extract; never changes what is written.
    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None
    scheduler: str = "none"
    threads: int | None = None
    runtime: str = "auto"  # what runs the encoders, as for extract

    def validate(self) -> None:
        if self.batch_size < 1:
            raise DuchError(f"`batch_size` must be at least 1, got {self.batch_size}")
        check_device(self.device)
        check_runtime(self.runtime)
        check_cluster(self.scheduler, self.threads)


@dataclass
class RemoveConfig:
    run: str
    ids: tuple[str, ...]  # image ids; an image's captions go with it

    def validate(self) -> None:
        if not self.ids:
            raise DuchError("no items to remove: give their image ids (`ids`)")


@dataclass
class CompactConfig:
    run: str
    # Segments of fewer items are merged; so is every segment holding removed items, which is rewritten without
    # them. Search pays a little per segment: a few large ones cost what one does.
    small: int = 100_000

    def validate(self) -> None:
        if self.small < 0:
            raise DuchError(f"`small` must be 0 or more items, got {self.small}")

"""Stage 1's settings: where the archive is, which encoders, how many augmented views, and how the work runs."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from duch.data.augment import ImageAugment, TextAugment
from duch.data.scene_dates import parse_date
from duch.pipeline import DuchError
from duch.pipeline.config.fields import check_cluster, check_device, output_settings
from duch.pipeline.encoders import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER
from duch.pipeline.encoders.runtime import check_runtime

if TYPE_CHECKING:  # rasterio's world: the config (and the CLI's --help, which reads its defaults) stays light
    from duch.data.scenes import TileOptions


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
    # Georeferenced scenes (data/scenes.py): with `tile` > 0, `data` names GeoTIFF scenes, each cut into tiles
    # of `tile` pixels every `stride` (0: the tile size), `bands` (1-based) as R, G, B, tiles with fewer than
    # `min_valid` valid pixels skipped, `date` for scenes without their own, `allow_ungeoreferenced` to accept
    # scenes without a CRS (footprints in pixels). Out of the fingerprint while at their defaults (SCENE_OPTIONS).
    tile: int = 0
    stride: int = 0
    bands: tuple[int, ...] = ()
    min_valid: float = 0.9
    date: str | None = None
    allow_ungeoreferenced: bool = False
    # Fill and STAC catalogs (issue 30; data/windows.py, data/stac.py): `nodata` the fill of bands without a
    # nodata tag; with `data` a STAC Item/ItemCollection/Collection/Catalog JSON or a stac-geoparquet file,
    # `assets` (keys or common names; default red,green,blue) as R, G, B; `max_cloud` (eo:cloud_cover, %),
    # `bbox` (lon/lat) and `date_from`/`date_to` keep only the items and tiles inside (local scenes too).
    nodata: float | None = None
    assets: tuple[str, ...] = ()
    max_cloud: float | None = None
    bbox: tuple[float, ...] = ()
    date_from: str | None = None
    date_to: str | None = None
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
    # What runs the encoders (encoders/runtime.py): "torch", "onnx" (ONNX Runtime, CPU) or "auto" (onnx on a CPU
    # where installed, for the encoders it serves). The runtime it resolves to enters the fingerprint through the
    # encoders' (their embeddings differ in the last bits), not this choice.
    runtime: str = "auto"

    RUNTIME_FIELDS = ("device", "batch_size", "text_batch_size", "workers", "decode", "run", "scheduler", "threads",
                      "runtime")
    # Options added after runs existed: left out of the fingerprint while at these defaults, so runs made before
    # them stay up to date.
    SCENE_OPTIONS = {"tile": 0, "stride": 0, "bands": (), "min_valid": 0.9, "date": None,
                     "allow_ungeoreferenced": False, "nodata": None, "assets": (), "max_cloud": None, "bbox": (),
                     "date_from": None, "date_to": None}

    def __post_init__(self):
        # The augmentations as a manifest records them (dicts, lists for tuples): ExtractConfig(**manifest["config"])
        # rebuilds the run's config.
        if isinstance(self.image_augment, dict):
            self.image_augment = ImageAugment.from_record(self.image_augment)
        if isinstance(self.text_augment, dict):
            self.text_augment = TextAugment(**self.text_augment)
        self.bands = tuple(self.bands or ())
        self.assets = tuple(self.assets or ())
        self.bbox = tuple(self.bbox or ())

    def validate(self) -> None:
        if self.seed < 0:  # it seeds numpy's generators of the augmented views, which take no negative seed
            raise DuchError(f"`seed` must be 0 or more, got {self.seed}")
        if self.image_views < 0:
            raise DuchError(f"`image_views` must be 0 or more, got {self.image_views}")
        if self.shard_size < 1:
            raise DuchError(f"`shard_size` must be at least 1, got {self.shard_size}")
        if self.batch_size < 1 or self.text_batch_size < 1:
            raise DuchError("batch sizes must be at least 1")
        if self.dtype not in ("float16", "float32"):
            raise DuchError(f"`dtype` must be float16 or float32, got {self.dtype!r}")
        check_device(self.device)
        check_runtime(self.runtime)
        if self.decode not in ("auto", "gpu", "cpu"):
            raise DuchError(f"`decode` must be auto, gpu or cpu, got {self.decode!r}")
        check_cluster(self.scheduler, self.threads)
        self.validate_scenes()

    def validate_scenes(self) -> None:
        if self.tile < 0 or self.stride < 0:
            raise DuchError(f"`tile` and `stride` must be 0 or more, got {self.tile} and {self.stride}")
        if not self.tile:
            if str(self.data).startswith(("http://", "https://", "file://")):
                raise DuchError(f"`data` {self.data} is read as a STAC catalog, whose items are cut into tiles; "
                                "give `tile` in pixels (e.g. 256)")
            given = [f"`{k}`" for k, v in self.SCENE_OPTIONS.items() if getattr(self, k) != v]
            if given:
                raise DuchError(f"{', '.join(given)} tile{'s' if len(given) == 1 else ''} scenes; give `tile` "
                                "in pixels (e.g. 256) to read `data` as GeoTIFF scenes")
            return
        if self.images:
            raise DuchError("`images` names the images of an annotation file; with `tile`, `data` names the scenes")
        if len(self.bands) not in (0, 1, 3) or any(not isinstance(b, int) or b < 1 for b in self.bands):
            raise DuchError(f"`bands` {','.join(map(str, self.bands))}: give three band numbers (R,G,B; e.g. "
                            "4,3,2 for Sentinel-2) or one (grey), counted from 1")
        if not 0 <= self.min_valid <= 1:
            raise DuchError(f"`min_valid` must be between 0 and 1 (a share of the tile), got {self.min_valid}")
        if self.date is not None and parse_date(self.date) != self.date:
            raise DuchError(f"`date` {self.date!r}: give the acquisition date as YYYY-MM-DD")
        self.validate_catalog()

    def validate_catalog(self) -> None:
        from duch.data.stac import is_catalog

        if self.nodata is not None and not math.isfinite(self.nodata):
            raise DuchError(f"`nodata` must be a number (NaN is never valid anyway), got {self.nodata}")
        for name in ("date_from", "date_to"):
            value = getattr(self, name)
            if value is not None and parse_date(value) != value:
                raise DuchError(f"`{name}` {value!r}: give a date as YYYY-MM-DD")
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise DuchError(f"`date_from` {self.date_from} is after `date_to` {self.date_to}")
        if self.bbox and (len(self.bbox) != 4 or not self.bbox[0] < self.bbox[2] or not self.bbox[1] < self.bbox[3]
                          or not -180 <= self.bbox[0] <= 180 or not -90 <= self.bbox[1] <= 90):
            raise DuchError(f"`bbox` {','.join(map(str, self.bbox))}: give min lon, min lat, max lon, max lat "
                            "(e.g. -120.5,37.2,-120.4,37.3)")
        if self.max_cloud is not None and not 0 <= self.max_cloud <= 100:
            raise DuchError(f"`max_cloud` is a percentage (0 to 100), got {self.max_cloud}")
        if is_catalog(self.data):
            if self.bands:
                raise DuchError("`bands` numbers a GeoTIFF's bands; a STAC item's are chosen by `assets`")
            if len(self.assets) not in (0, 1, 3) or not all(isinstance(a, str) and a.strip() for a in self.assets):
                raise DuchError(f"`assets` {','.join(map(str, self.assets))}: give three asset keys or common "
                                "names (R,G,B; e.g. red,green,blue) or one (grey)")
        elif self.assets or self.max_cloud is not None:
            raise DuchError("`assets` and `max_cloud` choose a STAC catalog's assets and items; `data` is not one "
                            "(a STAC JSON, a stac-geoparquet file or an http(s):// URL)")

    def tile_options(self) -> TileOptions:
        from duch.data.scenes import TileOptions

        return TileOptions(self.tile, self.stride, self.bands, self.min_valid, self.date,
                           self.allow_ungeoreferenced, self.nodata, self.bbox, self.date_from, self.date_to,
                           self.assets, self.max_cloud)

    def resolved_workers(self) -> int:
        if self.workers is not None:
            return max(0, self.workers)
        return min(8, max(1, (os.cpu_count() or 1) - 1))

    def output_settings(self) -> dict:
        # Where the data lives is an input, fingerprinted by content, not by path.
        out = output_settings(self, ("data", "images"))
        for name, default in self.SCENE_OPTIONS.items():
            if out[name] == default or (name in ("bands", "assets", "bbox") and tuple(out[name]) == default):
                del out[name]
        return out

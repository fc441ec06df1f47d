"""Where stage one's encoders get their input: images (with their augmented views) decoded by PIL in DataLoader
worker processes, or JPEG batches decoded on the GPU (encoders/batched.py), and captions tokenised ahead of the
model; and which of the two image paths a run takes."""
from __future__ import annotations

from pathlib import Path

import torch

from duch.data import Item
from duch.data.augment import augment_image, view_rng
from duch.data.images import ImageLoadError, load_image
from duch.data.scenes import TileSkipped, load_tile
from duch.pipeline import DuchError
from duch.pipeline.config import ExtractConfig
from duch.pipeline.embed.plan import ShardPlan


class Skipped(str):
    """The reason a scene tile was skipped (too few valid pixels): counted apart from the rejects."""


class ImageViews(torch.utils.data.Dataset):
    """Item i -> (i, [1+V, 3, H, W] pixels, None), or (i, None, reason) for an image that cannot be used (a
    Skipped reason for a scene tile with too few valid pixels). A scene tile's pixels are read from its window."""

    def __init__(self, items: list[Item], images_dir: Path, transform, cfg: ExtractConfig):
        self.items = items
        self.images_dir = images_dir
        self.transform = transform
        self.views = cfg.image_views
        self.seed = cfg.seed
        self.augment = cfg.image_augment
        self.min_valid = cfg.min_valid

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            if item.tile is not None:
                img = load_tile(self.images_dir, item, self.min_valid)
            else:
                img = load_image(self.images_dir / item.image)
            views = [self.transform(img)]
            views += [self.transform(augment_image(img, view_rng(self.seed, item.id, v), self.augment))
                      for v in range(1, self.views + 1)]
            return i, torch.stack(views), None
        except TileSkipped as e:
            return i, None, Skipped(str(e))
        except ImageLoadError as e:
            return i, None, str(e)
        except Exception as e:  # a decoder or transform failing on one odd file must not stop the run
            return i, None, f"cannot process image: {type(e).__name__}: {e}"


def collate_views(batch):
    ok = [(i, px) for i, px, _ in batch if px is not None]
    bad = [(i, reason) for i, _, reason in batch if reason is not None]
    pixels = torch.stack([px for _, px in ok]) if ok else None
    return [i for i, _ in ok], pixels, bad


def image_batches(plans: list[ShardPlan], batch_size: int) -> tuple[list[Item], list[list[int]], list[ShardPlan]]:
    items = [item for plan in plans for item in plan.rows]
    batches, owners, offset = [], [], 0
    for plan in plans:  # batches never straddle shards, so each shard is written as soon as it is complete
        n = len(plan.rows)
        for s in range(0, n, batch_size):
            batches.append(list(range(offset + s, offset + min(n, s + batch_size))))
            owners.append(plan)
        offset += n
    return items, batches, owners


# The batched path also runs on a CPU device (decoding with libjpeg-turbo through torchvision). It is not
# offered there: batching pays off on a GPU, while on a CPU PIL in worker processes is no slower. Tests switch
# it on to check the batched code against the PIL path on machines without a GPU.
BATCHED_ON_CPU = False


def jpeg_share(items: list[Item]) -> float:
    return sum(1 for item in items if Path(item.image).suffix.lower() in (".jpg", ".jpeg")) / max(1, len(items))


def choose_decode(cfg: ExtractConfig, jpegs: float, encoder, device: torch.device):
    """("gpu", TensorPreprocess) for the batched path, or ("cpu", why the PIL path runs)."""
    from duch.pipeline.encoders.gpu_decode import TensorPreprocess, nvjpeg_problem

    if cfg.decode == "cpu":
        return "cpu", "--decode cpu"
    problems = decode_problems(cfg, device)
    prep = TensorPreprocess.from_transform(encoder.transform)
    if prep is None:
        problems.append(f"{encoder.spec}'s preprocessing has steps only the PIL path runs")
    if device.type == "cuda" and not problems:
        problem = nvjpeg_problem(device)
        if problem:
            problems.append(f"nvJPEG is not usable ({problem})")
    if cfg.decode == "auto" and not problems:
        if jpegs < 0.5:  # the rest would go to PIL on threads, slower than worker processes
            problems.append("most images are not JPEG")
    if problems:
        if cfg.decode == "gpu":
            raise DuchError(f"`decode` gpu: {'; '.join(problems)}; use `decode` auto or cpu")
        return "cpu", "; ".join(problems)
    return "gpu", prep


def decode_problems(cfg: ExtractConfig, device: torch.device) -> list[str]:
    """What rules the batched path out before any encoder is loaded."""
    problems = []
    if cfg.tile:
        problems.append("scene tiles are read by window with rasterio")
    if device.type != "cuda" and not BATCHED_ON_CPU:
        problems.append("the device is not a CUDA GPU")
    if cfg.image_views:
        problems.append("augmented views (--image-views > 0) are made with PIL")
    return problems


class TokenBatches(torch.utils.data.Dataset):
    """Batch k -> its captions tokenised (or as they are, for an encoder that tokenises inside encode)."""

    def __init__(self, batches: list[list[str]], tokenizer):
        self.batches = batches
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int):
        texts = self.batches[k]
        return self.tokenizer(texts) if self.tokenizer is not None else texts

"""Augmented views for DUCH's intra-modal contrastive terms.

Every random draw comes from a generator seeded by (run seed, item id, view number), so a view is the same
whatever the batch, worker or machine that makes it, and a resumed run reproduces the views it lost.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter


@dataclass(frozen=True)
class ImageAugment:
    """Overhead imagery has no 'up': 90-degree rotations and flips keep an image's meaning."""

    rotate90: bool = True
    flip_p: float = 0.5
    crop_scale: tuple[float, float] = (0.5, 1.0)  # share of the area kept by the random crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: float = 0.2  # brightness, contrast and saturation factors drawn from 1 +- jitter
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.5)

    @classmethod
    def from_record(cls, record: dict) -> ImageAugment:
        """The settings as a manifest records them (JSON: lists where the fields hold tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})


@dataclass(frozen=True)
class TextAugment:
    """Rule-based second view for an image that has a single caption."""

    word_dropout: float = 0.1
    swap_p: float = 0.5  # chance of swapping one random pair of neighbouring words


def view_rng(seed: int, item_id: str, view: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(item_id.encode("utf-8")), view])


def augment_image(img: Image.Image, rng: np.random.Generator, cfg: ImageAugment = ImageAugment()) -> Image.Image:
    width, height = img.size
    if cfg.rotate90:
        k = int(rng.integers(4))
        if k:
            turns = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)
            img = img.transpose(turns[k - 1])
    if rng.random() < cfg.flip_p:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = _random_resized_crop(img, rng, cfg)
    if cfg.jitter > 0:
        import torchvision.transforms.functional as TF  # here: ImageAugment is read without torch (configs, --help)

        low, high = 1 - cfg.jitter, 1 + cfg.jitter
        img = TF.adjust_brightness(img, float(rng.uniform(low, high)))
        img = TF.adjust_contrast(img, float(rng.uniform(low, high)))
        img = TF.adjust_saturation(img, float(rng.uniform(low, high)))
    if rng.random() < cfg.blur_p:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(*cfg.blur_sigma))))
    return img


def _random_resized_crop(img: Image.Image, rng: np.random.Generator, cfg: ImageAugment) -> Image.Image:
    width, height = img.size
    area = width * height
    for _ in range(10):  # as torchvision's RandomResizedCrop: a few tries, else the whole image
        target = area * rng.uniform(*cfg.crop_scale)
        ratio = np.exp(rng.uniform(np.log(cfg.crop_ratio[0]), np.log(cfg.crop_ratio[1])))
        w = int(round(np.sqrt(target * ratio)))
        h = int(round(np.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return img.resize((width, height), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    return img


def augment_caption(text: str, rng: np.random.Generator, cfg: TextAugment = TextAugment()) -> str:
    words = text.split()
    if len(words) > 1 and cfg.word_dropout > 0:
        keep = rng.random(len(words)) >= cfg.word_dropout
        if not keep.any():
            keep[int(rng.integers(len(words)))] = True
        words = [w for w, k in zip(words, keep) if k]
    if len(words) > 1 and rng.random() < cfg.swap_p:
        i = int(rng.integers(len(words) - 1))
        words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)

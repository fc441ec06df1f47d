"""Queries: the one check of what a search was asked (exactly one query, k and rerank_top in range), used by
`Index.search`, the CLI and the service; and coding a query as an archive's items were coded: a caption through
the text encoder and head, an image through the image encoder (with the archive's augmented views, where its image
codes average them) and head. The model and encoders load on first use and can be shared between archives coded
by one model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from duch.pipeline import DuchError
from duch.pipeline.formats.weights import load_model
from duch.pipeline.model.coding import image_codes, pack_codes
from duch.pipeline.run.records import EncodedRun

if TYPE_CHECKING:
    from PIL import Image

    from duch.pipeline.model.heads import DuchHeads


# What each kind of query is, as the "exactly one query" message lists them; a caller lists the kinds it takes.
QUERY_KINDS = {"text": "a caption", "image": "an image file", "id": "an archive item"}


def check_query(text=None, image=None, id=None, k: int = 1, rerank_top: int = 0,
                kinds: tuple[str, ...] = tuple(QUERY_KINDS), feedback: bool = False) -> str:
    """The kind of the one query given ("text", "image" or "id"), or the DuchError naming what is wrong: no query,
    two at once, `k` under 1 or `rerank_top` under 0. `kinds`: the kinds the caller takes (the message lists them).
    `feedback`: marked examples were given (retrieval/refine.py), which may stand alone: "examples" when no query."""
    given = [kind for kind, value in (("text", text), ("image", image), ("id", id)) if value is not None]
    if feedback and not given and k >= 1 and rerank_top >= 0:
        return "examples"
    if len(given) != 1:
        what = "no query" if not given else f"{' and '.join(f'`{kind}`' for kind in given)} at once"
        listed = [f"`{kind}` ({QUERY_KINDS[kind]})" for kind in kinds]
        examples = "" if given else " (or images marked right or wrong: `positives`, `negatives`)"
        raise DuchError(f"{what}: give exactly one of {', '.join(listed[:-1])} or {listed[-1]}{examples}")
    if k < 1 or rerank_top < 0:
        raise DuchError(f"`k` must be at least 1 and `rerank_top` 0 or more, got k={k}, rerank_top={rerank_top}")
    return given[0]


@dataclass
class Query:
    """A coded query: the modality it came from, its packed code [1, K/8] and its continuous code [K] (None for an
    archive item whose continuous outputs were not stored)."""

    source: str
    packed: np.ndarray
    continuous: np.ndarray | None

    @classmethod
    def of(cls, source: str, h: np.ndarray) -> Query:
        """A query from its continuous code: the sign bits packed as the archive's are."""
        return cls(source, pack_codes(np.asarray(h)[None]), np.asarray(h))


class QueryCoder:
    """The heads and encoders that coded an archive (its encode-archive stage, `encoded`), for one code length."""

    def __init__(self, encoded: EncodedRun, bits: int, device: torch.device, runtime: str = "auto"):
        self.encoded, self.stage, self.bits, self.device = encoded, encoded.folder, bits, device
        self.runtime = runtime  # what runs the encoders (encoders/runtime.py): a query's embedding, like extract's
        self._heads: DuchHeads | None = None
        self._encoders: dict = {}

    @property
    def heads(self):
        if self._heads is None:
            self._heads = load_model(self.encoded.model_file(self.bits), self.device)
        return self._heads

    def model_key(self) -> tuple:
        """What codes a query for this index: the model file's SHA-256 and the encoders. Two indexes with the same
        key code a caption the same way."""
        return self.encoded.models[self.bits].sha256, repr(sorted(self.encoded.encoders.items()))

    @property
    def modalities(self) -> list[str]:
        """The modalities it codes: those the model has an encoder for."""
        return list(self.encoded.encoders)

    def share(self, other: QueryCoder) -> None:
        """Use `other`'s heads and encoders: one model in memory for several archives coded by it."""
        if self.model_key() != other.model_key():
            raise DuchError(f"{self.stage} and {other.stage} were coded by different models; each needs its own")
        self._heads, self._encoders = other.heads, other._encoders

    def _encoder(self, modality: str):
        if modality not in self._encoders:
            from duch.pipeline.encoders import load_encoders, parse_spec

            used = self.encoded.encoders.get(modality)
            if used is None or not used.spec:
                raise DuchError(f"the model in {self.encoded.model_run} has no {modality} encoder")
            spec = used.spec
            parsed = parse_spec(spec, modality).with_runtime(self.runtime, self.device.type)
            image, text = load_encoders(parsed if modality == "image" else None,
                                        parsed if modality == "text" else None, str(self.device))
            self._encoders[modality] = image if modality == "image" else text
        return self._encoders[modality]

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> np.ndarray:
        """Captions -> continuous codes [Q, K] through the text encoder and head. A query follows the caption rules
        extract's captions do (data/text.py): control characters removed, cut to MAX_CAPTION_CHARS before the
        tokenizer sees it; one left empty, or not valid Unicode, is refused."""
        from duch.data.text import clean_caption

        cleaned = []
        for text in texts:
            caption = clean_caption(text) if isinstance(text, str) else None
            if caption is None or caption.text is None:
                reason = caption.reason if caption else f"a {type(text).__name__}, not text"
                raise DuchError(f"query text {shown(text)}: {reason}; give a caption such as 'many planes at the "
                                "airport'")
            cleaned.append(caption.text)
        emb = self._encoder("text").encode(cleaned).to(self.device)
        return self.heads.text(emb.float()).float().cpu().numpy()

    def embed_image(self, paths: list[str | Path]) -> np.ndarray:
        """Image files -> continuous codes [Q, K], converted and embedded as extract does (see embed_images)."""
        from duch.data.images import ImageLoadError, load_image

        images = []
        for path in paths:
            try:
                images.append((Path(path).stem, load_image(Path(path))))
            except ImageLoadError as e:
                raise DuchError(f"query image {path}: {e}") from None
        return self.embed_images(images)

    def embed_images(self, images: list[tuple[str, Image.Image]]) -> np.ndarray:
        """(name, RGB image) pairs -> continuous codes [Q, K]. Where the archive's image codes average the head
        over augmented views (encode-archive's `image_code`), the query's are made the same way, its views drawn
        as extract draws an item's with `name` (a file's name stem) as the id: an archive image given as a query,
        under its own file name, gets its archive code."""
        return self.embed_pixels([self.image_pixels(name, img) for name, img in images])

    def image_pixels(self, name: str, img: Image.Image) -> torch.Tensor:
        """An image and its augmented views as the encoder takes them, [1 + V, 3, H, W]: the CPU work of an image
        query before its encoder pass (the service runs it on its request threads, in parallel)."""
        from duch.data.augment import ImageAugment, augment_image, view_rng

        encoder = self._encoder("image")
        code = self.encoded.image_code
        n_views = int(code["views"])
        pixels = [encoder.transform(img)]
        if n_views:  # the views extract drew for an item of this name
            augment = ImageAugment.from_record(code["augment"])
            pixels += [encoder.transform(augment_image(img, view_rng(int(code["seed"]), name, v), augment))
                       for v in range(1, n_views + 1)]
        return torch.stack(pixels)

    @torch.no_grad()
    def embed_pixels(self, pixels: list[torch.Tensor]) -> np.ndarray:
        """image_pixels' outputs -> continuous codes [Q, K]: every image's views in one encoder pass."""
        encoder = self._encoder("image")
        n_views = int(self.encoded.image_code["views"])
        emb = encoder.encode(torch.cat(pixels)).to(self.device).float().view(len(pixels), 1 + n_views, -1)
        return image_codes(self.heads.image, emb[:, 0], emb[:, 1:] if n_views else None).float().cpu().numpy()


def shown(query, most: int = 60) -> str:
    """A query as a message shows it: quoted, on one line, its first `most` characters."""
    text = repr(query[:most]) if isinstance(query, str) else repr(query)[:most]
    return text + (f" (... {len(query):,} characters)" if isinstance(query, str) and len(query) > most else "")

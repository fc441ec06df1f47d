"""The archives a service searches: each a `ServedArchive`, one encoded archive's `Index` with what the API shows
of its items (labels, captions, the image file behind an id, a scene tile's place) and the label and place filters
it applies before the top k.

Every file the service reads for an item is named by the archive's own metadata, looked up by id: nothing a
request sends is ever joined to a path.
"""
from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from duch.pipeline import DuchError
from duch.pipeline.config.serve import ServeConfig
from duch.pipeline.formats.codes import caption_key
from duch.pipeline.retrieval.filters import PlaceFilter
from duch.pipeline.retrieval.places import Place, place_of
from duch.pipeline.retrieval.search import Index, UnknownItem
from duch.pipeline.serve.maps import ArchiveMap, place_json


class ServedArchive:
    """One encoded archive as the service sees it."""

    def __init__(self, name: str, index: Index):
        self.name, self.index = name, index
        self.map = ArchiveMap(index)
        self._masks: dict[tuple[str, str], np.ndarray] = {}
        self._lock = threading.Lock()

    @property
    def modalities(self) -> list[str]:
        return list(self.index.tables)

    def count(self, modality: str) -> int:
        """Items of `modality` in the archive's generation, removed ones not counted."""
        if modality not in self.index.tables:
            return 0
        return len(self.index.tables[modality]) - self.index.archive.removed_count[modality]

    @functools.cached_property
    def _image_meta(self) -> dict:
        return self.index.tables["image"].meta

    @functools.cached_property
    def labels_of(self) -> dict[str, np.ndarray]:
        """Each modality's label per row (a caption's is its image's; '' where there is none)."""
        labels = {"image": np.asarray(self._image_meta["label"], dtype=str)}
        if "text" in self.index.tables:
            row_of = self.index.tables["image"].row_of
            rows = np.array([row_of.get(str(i), -1) for i in self.index.tables["text"].meta["image_id"]], np.int64)
            labels["text"] = np.where(rows >= 0, labels["image"][np.maximum(rows, 0)], "")
        return labels

    @functools.cached_property
    def labels(self) -> list[str]:
        return sorted(set(self.labels_of["image"].tolist()) - {""})

    @functools.cached_property
    def _captions(self) -> dict[str, list[tuple[str, str]]]:
        """Image id -> [(caption id, text)], in caption order."""
        out: dict[str, list[tuple[str, str]]] = {}
        if "text" in self.index.tables:
            meta = self.index.tables["text"].meta
            for image_id, index, text in zip(meta["image_id"], meta["caption_index"], meta["text"]):
                out.setdefault(str(image_id), []).append((caption_key(image_id, index), str(text)))
        return out

    def captions_of(self, image_id: str) -> list[tuple[str, str]]:
        return self._captions.get(image_id, [])

    def where(self, modality: str, label: str | None, places: PlaceFilter | None = None) -> np.ndarray | None:
        """The label and place filters as one bool mask over `modality`'s rows (None: no filter); a label's mask is
        built once, a place filter's for each query."""
        mask = self.map.mask(places, modality) if places is not None else None
        if label is None:
            return mask
        if label not in self.labels:
            shown = ", ".join(self.labels[:30]) + (" ..." if len(self.labels) > 30 else "")
            raise DuchError(f"label {label!r} is not in archive {self.name!r} (its labels: {shown or 'none'})")
        key = (modality, label)
        with self._lock:
            if key not in self._masks:
                self._masks[key] = (self.labels_of[modality] == label) & ~self.index.archive.removed[modality]
            labelled = self._masks[key]
        return labelled if mask is None else labelled & mask

    def image_id_of(self, item_id: str) -> str:
        modality, row = self.index.locate(item_id)
        return item_id if modality == "image" else str(self.index.tables["text"].meta["image_id"][row])

    def image_file(self, item_id: str) -> Path:
        """The image file behind an id (a caption's: its image's), as the archive's metadata names it."""
        row = self.index.tables["image"].row_of.get(self.image_id_of(item_id))
        if row is None:
            raise UnknownItem(f"the image of caption {item_id!r} is not in archive {self.name!r}")
        return self.index.archive.image_path(row)

    def place(self, item_id: str) -> Place | None:
        """A scene tile's place (a caption's: its image's); None for an image that is no scene tile."""
        row = self.index.tables["image"].row_of.get(self.image_id_of(item_id))
        return None if row is None else place_of(self.index.tables["image"], row)

    def item(self, item_id: str) -> dict:
        """What the API shows of an item: its kind, label and captions (a caption's: itself first)."""
        modality, row = self.index.locate(item_id)
        image_id = self.image_id_of(item_id)
        image_row = self.index.tables["image"].row_of.get(image_id)
        captions = self.captions_of(image_id)
        if modality == "text":
            captions = sorted(captions, key=lambda c: c[0] != item_id)
        return {"id": item_id, "modality": modality, "image_id": image_id,
                "label": (self.labels_of[modality][row] or None),
                "file": None if image_row is None else str(self._image_meta["path"][image_row]),
                "captions": [{"id": i, "text": t} for i, t in captions],
                "place": place_json(None if image_row is None else place_of(self.index.tables["image"], image_row))}

    def warm(self) -> None:
        """Build what the first query would (each modality's scan, labels, captions, places) before serving any."""
        index = self.index
        for modality in self.modalities:
            if (first := self._first_id(modality)) is not None:  # None: every item of it was removed
                index.rank(index.id_query(first), k=1, modality=modality, ties="order")
        self.labels_of, self._captions, self.map.info()  # noqa: B018  (built here, not on the first request)

    def warm_model(self) -> None:
        """Load the heads and query encoders with one pass each: once for every archive that shares them."""
        coder = self.index.coder
        if "text" in coder.modalities:
            coder.embed_text(["warm up"])
        coder.embed_images([("warm-up", Image.new("RGB", (64, 64)))])

    def _first_id(self, modality: str) -> str | None:
        """The first item not removed (`duch remove`) of a modality: what warm() queries by."""
        table = self.index.tables[modality]
        kept = np.flatnonzero(~self.index.archive.removed[modality])
        if not len(kept):
            return None
        row = int(kept[0])
        if modality == "image":
            return str(table.meta["ids"][row])
        return caption_key(table.meta["image_id"][row], table.meta["caption_index"][row])


def open_archives(config: ServeConfig) -> dict[str, ServedArchive]:
    """The run's own encoded archive, then each of `config.archives`, by folder name; every one must have been
    coded by the run's model (the heads and encoders are loaded once and shared)."""
    main = Index.load(config.run, bits=config.bits, device=config.device, verify=config.verify,
                      runtime=config.runtime)
    archives = {_name(config.run, {}): ServedArchive(_name(config.run, {}), main)}
    for run in config.archives:
        index = Index.load(run, bits=config.bits, device=config.device, verify=config.verify, runtime=config.runtime)
        if index.coder.model_key() != main.coder.model_key():
            raise DuchError(f"archive {run} was coded by another model than {config.run}'s {config.bits}-bit one; "
                            f"code it with this run's model: the encode-archive stage of {config.run} with "
                            f"`archive` {run}")
        index.coder.share(main.coder)
        name = _name(run, archives)
        archives[name] = ServedArchive(name, index)
    return archives


def _name(run: str, taken: dict) -> str:
    base = Path(run).resolve().name or "archive"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name

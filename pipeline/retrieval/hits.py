"""What a search returns: each item found as a `Hit`, with what the archive's metadata says of it (its id, label,
image file, caption, and a scene tile's place)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from duch.pipeline.archive.segments import ArchiveCodes
from duch.pipeline.formats.codes import caption_key
from duch.pipeline.retrieval.places import Place, place_of


@dataclass
class Hit:
    rank: int
    modality: str  # of the item found: "image" or "text"
    row: int  # row in the code file
    id: str  # image id; for a caption "IMAGE_ID#CAPTION_INDEX"
    image_id: str
    distance: int  # Hamming distance to the query's code
    score: float | None  # cosine of the continuous outputs when re-ranked; else, with adaptive ties, the query's
    # confidence (0 to 1 a bit) summed over the differing bits: equal distances are ordered by it, lowest first
    label: str | None
    path: str | None  # the image file (the item's, or the caption's image; a scene tile's scene)
    caption: str | None
    place: Place | None = None  # a scene tile's footprint, date and window (retrieval/places.py)

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.place is None:  # the form hits had before scenes
            del out["place"]
        else:
            out["place"] = self.place.to_dict()
        return out


def make_hits(codes: ArchiveCodes, modality: str, distances: np.ndarray, rows: np.ndarray,
              scores: np.ndarray | None) -> list[Hit]:
    """The hits of a ranking (rows of `modality`'s codes, best first), ranked from 1."""
    return [make_hit(codes, rank, modality, int(r), int(d), None if scores is None else float(scores[rank]))
            for rank, (r, d) in enumerate(zip(rows, distances))]


def make_hit(codes: ArchiveCodes, rank: int, modality: str, row: int, distance: int, score: float | None) -> Hit:
    """One hit: an image with its label, file and place; a caption with its text and its image's label and file."""
    meta = codes.tables[modality].meta
    place, path = None, None  # type: Place | None, str | None
    if modality == "image":
        image_id, item_id, caption = str(meta["ids"][row]), str(meta["ids"][row]), None
        label, path = str(meta["label"][row]) or None, str(codes.image_path(row))
        place = place_of(codes.tables[modality], row)
    else:
        image_id = str(meta["image_id"][row])
        item_id, caption = caption_key(image_id, meta["caption_index"][row]), str(meta["text"][row])
        image_row = codes.tables["image"].row_of.get(image_id)
        images = codes.tables["image"].meta
        label = (str(images["label"][image_row]) or None) if image_row is not None else None
        path = str(codes.image_path(image_row)) if image_row is not None else None
    return Hit(rank + 1, modality, row, item_id, image_id, distance, score, label, path, caption, place)

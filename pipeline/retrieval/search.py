"""Searching an encoded archive: `Index.load(run, bits=64).search(text="many planes at the airport", k=10)`.

A query (a caption, an image file, or an archive item) is embedded with the archive's encoder, passed through
the trained head and packed (retrieval/queries.py), then matched against the archive's packed codes by exact
Hamming distance, nearest first (retrieval/scan.py). Equal distances are ordered by the query's own continuous
code (`ties="adaptive"`, the default: first the items that differ from it only on the bits it is least sure of;
the archive stays 1 bit per bit) or in archive order (`ties="order"`). With `rerank_top=N` the N nearest by
Hamming are re-ordered by the cosine similarity of the heads' continuous outputs (stored when the archive is
encoded with `continuous`): hash-speed shortlisting, near-float ranking. The items found come back as hits
(retrieval/hits.py).

`Index` composes the parts: an archive's codes (`archive`, archive/segments.ArchiveCodes), the query coder
(`coder`), the search over the codes (`scan`), and the hits.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from duch.pipeline import DuchError
from duch.pipeline.archive.generation import read_generation
from duch.pipeline.archive.segments import ArchiveCodes, open_archive_codes
from duch.pipeline.compute.device import resolve_device
from duch.pipeline.encoders.runtime import check_runtime
from duch.pipeline.model.coding import unpack_codes
from duch.pipeline.retrieval.hits import Hit, make_hits
from duch.pipeline.retrieval.queries import Query, QueryCoder, check_query, shown
from duch.pipeline.retrieval.refine import Feedback, refined_query
from duch.pipeline.retrieval.scan import CodeScan, check_backend
from duch.pipeline.run.records import EncodedRun


class UnknownItem(DuchError, LookupError):
    """An id that is not in the archive, or was removed from it; the message says what ids look like."""


class Index:
    """The codes of one code length of an encoded archive, with the model that made them."""

    def __init__(self, run: Path, bits: int, archive: ArchiveCodes, device, backend: str = "auto",
                 verify: bool = True, runtime: str = "auto"):
        self.run, self.bits, self.archive, self.device = Path(run), bits, archive, device
        self.verify = verify  # the SHA-256 of every file read against the manifest (sizes are always checked)
        # The run's own encode-archive (the first segment's) names the model, the encoders and the image-code rule.
        self.coder = QueryCoder(archive.encoded[0], bits, device, runtime)
        self.scan = CodeScan(self.run, bits, archive, device, backend, verify)

    @classmethod
    def load(cls, run: str | Path, bits: int = 64, device: str = "auto", backend: str = "auto",
             verify: bool = True, runtime: str = "auto") -> Index:
        """The codes of one code length of a finished encode-archive stage, checked against its manifest:
        `verify=False` checks sizes only, for archives of billions of codes whose hashing takes minutes. `runtime`:
        what runs the query encoders (auto, torch, onnx: encoders/runtime.py)."""
        encoded = EncodedRun.read(run)
        if bits not in encoded.models:
            raise DuchError(f"{encoded.folder} holds codes of {', '.join(map(str, encoded.bits))} bits, not {bits}; "
                            "give one of those as `bits`")
        check_backend(backend)
        check_runtime(runtime)
        for attempt in range(3):  # a generation published while this one was being opened: open the new one
            generation = read_generation(run)
            try:
                archive = open_archive_codes(run, bits, verify, generation)
                break
            except (DuchError, OSError):
                if attempt == 2 or read_generation(run).number == generation.number:
                    raise
        return cls(Path(run), bits, archive, resolve_device(device), backend, verify, runtime)

    @property
    def tables(self):
        return self.archive.tables

    @property
    def generation(self) -> int:
        return self.archive.generation.number

    @property
    def backend(self) -> str:
        """The CPU scan: "auto" (faiss when installed, else numpy), "faiss" or "numpy"."""
        return self.scan.backend

    @backend.setter
    def backend(self, backend: str) -> None:
        self.scan = CodeScan(self.run, self.bits, self.archive, self.device, backend, self.verify)

    @property
    def images_dir(self) -> Path:
        """The images folder of the run's own archive (segments added later have theirs: archive.image_path)."""
        return self.archive.images_dirs[0]

    def search(self, text: str | None = None, image: str | Path | None = None, id: str | None = None, k: int = 10,
               modality: str | None = None, rerank_top: int = 0, ties: str = "adaptive",
               where: np.ndarray | None = None, positives=(), negatives=(), exclude_marked: bool = False,
               rocchio: tuple[float, float, float] | None = None) -> list[Hit]:
        """Top-k archive items for one query. `modality`: what to return, by default the other modality than
        the query's (images when the archive holds no captions). `rerank_top`: re-rank that many by cosine.
        `ties`: equal distances by the query's confidence ("adaptive"; in archive order for an `id` query whose
        continuous outputs were not stored) or in archive order ("order"). `where`: [N] bool over the returned
        modality's rows, a filter applied before the top k (it never shrinks k below the items it lets
        through). `positives`, `negatives`: archive image ids marked right and wrong, alone or with the query,
        which refine it (retrieval/refine.py; `rocchio`: its three weights); `exclude_marked` leaves them out of
        the hits."""
        feedback = Feedback.parse(positives, negatives, rocchio, exclude_marked)
        check_query(text, image, id, k, rerank_top, feedback=feedback.active)
        query = None
        if text is not None:
            query = Query.of("text", self.coder.embed_text([text])[0])
        elif image is not None:
            query = Query.of("image", self.coder.embed_image([image])[0])
        elif id is not None:
            query = self.id_query(id)
        if feedback.active:
            target = self.target(query, modality)
            query = self.refine(query, feedback)
            where = self.unmarked(target, feedback, where)
            modality = target
        assert query is not None  # check_query: a query or examples
        return self.rank(query, k, modality, rerank_top, ties, where)

    def rank(self, query: Query, k: int = 10, modality: str | None = None, rerank_top: int = 0,
             ties: str = "adaptive", where: np.ndarray | None = None) -> list[Hit]:
        """The top k for a query already coded (`search`'s second half; a service codes many at once)."""
        target = self.target(query, modality)
        return make_hits(self.archive, target, *self.scan.ranked(query, target, k, rerank_top, ties, where))

    def target(self, query: Query | None, modality: str | None) -> str:
        """What a query returns: `modality`, or by default the other modality than its own (examples alone, no
        query: images like them)."""
        if query is None:
            return modality or "image"
        return modality or ("image" if query.source == "text" or "text" not in self.tables else "text")

    def locate(self, item_id: str) -> tuple[str, int]:
        """(modality, row) of an archive id: an image id, or IMAGE_ID#CAPTION_INDEX for a caption; UnknownItem
        for an id not in the archive or removed from it."""
        modality = "text" if "#" in item_id and "text" in self.tables else "image"
        row = self.tables[modality].row_of.get(item_id)
        if row is not None and self.archive.removed[modality][row]:
            raise UnknownItem(f"`id` {shown(item_id)} was removed from the archive (by the remove stage)")
        if row is None:
            ids = self.tables["image"].meta["ids"]
            example = str(ids[0]) if len(ids) else "1"
            raise UnknownItem(f"`id` {shown(item_id)} is not in the archive (image ids look like {example!r}, "
                              f"captions like {example + '#0'!r})")
        return modality, row

    def id_query(self, item_id: str) -> Query:
        """An archive item as a query: its stored code (and continuous outputs, when stored)."""
        source, row = self.locate(item_id)
        table = self.tables[source]
        h = None if table.continuous is None else table.continuous[row].astype(np.float32)
        return Query(source, np.asarray(table.codes[row:row + 1]), h)

    def feedback_rows(self, ids: tuple[str, ...]) -> np.ndarray:
        """The image rows of feedback ids; one UnknownItem naming every id that is not an image of this archive
        (unknown, removed, or a caption)."""
        table, removed = self.tables["image"], self.archive.removed["image"]
        rows: list[int] = []
        unknown: list[str] = []
        gone: list[str] = []
        captions: list[str] = []
        for item_id in ids:
            row = table.row_of.get(item_id)
            if row is None:
                (captions if "#" in item_id and self.tables.get("text") is not None
                 and item_id in self.tables["text"].row_of else unknown).append(item_id)
            elif removed[row]:
                gone.append(item_id)
            else:
                rows.append(row)
        if unknown or gone or captions:
            ids_ = table.meta["ids"]
            parts = [f"not in the archive: {', '.join(shown(i, 40) for i in unknown)} (image ids look like "
                     f"{str(ids_[0]) if len(ids_) else '1'!r})" if unknown else "",
                     f"removed from it (by the remove stage): {', '.join(shown(i, 40) for i in gone)}" if gone else "",
                     f"captions, not images: {', '.join(shown(i, 40) for i in captions)}" if captions else ""]
            raise UnknownItem(f"`positives` and `negatives` name archive images; {'; '.join(p for p in parts if p)}")
        return np.asarray(rows, np.int64)

    def refine(self, query: Query | None, feedback: Feedback) -> Query:
        """The query refined by the marked images (retrieval/refine.py): Rocchio over the continuous outputs, or
        the weighted majority vote of the codes where the archive stored none."""
        table, bits = self.tables["image"], self.bits
        rows = self.feedback_rows(feedback.marked)  # every id checked at once: one error names them all
        pos, neg = rows[:len(feedback.positives)], rows[len(feedback.positives):]

        def rows_of(array, rows, width):
            return np.asarray(array[np.sort(rows)], np.float32) if len(rows) else np.zeros((0, width), np.float32)

        stored = table.continuous
        h, _rule = refined_query(None if query is None else query.continuous,
                                 None if query is None else unpack_codes(query.packed, bits)[0],
                                 None if stored is None else rows_of(stored, pos, bits),
                                 None if stored is None else rows_of(stored, neg, bits),
                                 unpack_codes(rows_of(table.codes, pos, bits // 8).astype(np.uint8), bits),
                                 unpack_codes(rows_of(table.codes, neg, bits // 8).astype(np.uint8), bits),
                                 feedback.weights)
        return Query.of(query.source if query is not None else "image", h)

    def unmarked(self, target: str, feedback: Feedback, where: np.ndarray | None) -> np.ndarray | None:
        """`where` without the marked images (a caption search: without their captions) when `exclude_marked`."""
        if not feedback.exclude_marked:
            return where
        table = self.tables[target]
        if target == "image":
            keep = np.ones(len(table), bool)
            keep[self.feedback_rows(feedback.marked)] = False
        else:
            keep = ~np.isin(np.asarray(table.meta["image_id"]).astype(str), list(feedback.marked))
        return keep if where is None else np.asarray(where, bool) & keep

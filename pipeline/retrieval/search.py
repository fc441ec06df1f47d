"""Searching an encoded archive: `Index.load(run, bits=64).search(text="many planes at the airport", k=10)`.

A query (a caption, an image file, or an archive item) is embedded with the archive's encoder, passed through
the trained head and packed, then matched against the archive's packed codes by exact Hamming distance
(XOR + popcount: faiss' IndexBinaryFlat or a numpy scan over the memory-mapped file on CPU, a Triton kernel
on a GPU; all return the same rows), nearest first. Equal distances are ordered by the query's own continuous
code (`ties="adaptive"`, the default: first the items that differ from it only on the bits it is least sure of;
the archive stays 1 bit per bit) or in archive order (`ties="order"`). With `rerank=N` the N nearest by Hamming
are re-ordered by the cosine similarity of the heads' continuous outputs (stored by `encode-archive
--continuous`): hash-speed shortlisting, near-float ranking.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from duch.pipeline import DuchError
from duch.pipeline.archive.generation import BASE, read_generation
from duch.pipeline.archive.segments import ArchiveCodes, open_archive_codes, verify_generation_index
from duch.pipeline.compute.device import resolve_device
from duch.pipeline.formats.codes import CodeTable, caption_key
from duch.pipeline.model.coding import pack_codes
from duch.pipeline.retrieval.hamming import hamming_topk, hamming_topk_torch, to_int64_words
from duch.pipeline.retrieval.hamming_gpu import available as gpu_kernel_available
from duch.pipeline.retrieval.hamming_gpu import hamming_topk_triton, to_int32_words
from duch.pipeline.retrieval.places import Place, place_of
from duch.pipeline.retrieval.queries import QueryCoder, shown
from duch.pipeline.retrieval.ranking import TIES, adaptive_topk, rerank
from duch.pipeline.run.artifacts import stage_file, verify_listed
from duch.pipeline.run.layout import stage_dir
from duch.pipeline.run.manifest import read_manifest

if TYPE_CHECKING:
    from PIL import Image


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
        return out


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


class Index:
    """The codes of one code length of an encoded archive, with the model that made them."""

    def __init__(self, run: Path, bits: int, archive: ArchiveCodes, device: torch.device, backend: str = "auto",
                 verify: bool = True):
        self.run, self.bits, self.archive, self.device = run, bits, archive, device
        self.manifest = archive.manifests[0]  # the run's own encode-archive: models, encoders, the image-code rule
        self.tables = archive.tables
        self.generation = archive.generation.number
        self.verify = verify  # the SHA-256 of every file read against the manifest (sizes are always checked)
        self.backend = backend  # CPU: "auto" (faiss when installed, else numpy), "faiss" or "numpy"
        self.coder = QueryCoder(self.manifest, archive.folders[0], bits, device)
        self._backends: dict[str, object] = {}

    @classmethod
    def load(cls, run: str | Path, bits: int = 64, device: str = "auto", backend: str = "auto",
             verify: bool = True) -> Index:
        """The codes of one code length of a finished encode-archive stage, checked against its manifest:
        `verify=False` checks sizes only, for archives of billions of codes whose hashing takes minutes."""
        out_dir, manifest = load_encode_manifest(run)
        if str(bits) not in manifest["models"]:
            raise DuchError(f"{out_dir} holds codes of {', '.join(manifest['models'])} bits, not {bits}; "
                            f"pick one of those with --bits")
        if backend not in ("auto", "faiss", "numpy"):
            raise DuchError(f"backend must be auto, faiss or numpy, got {backend!r}")
        for attempt in range(3):  # a generation published while this one was being opened: open the new one
            generation = read_generation(run)
            try:
                archive = open_archive_codes(run, bits, verify, generation)
                break
            except (DuchError, OSError):
                if attempt == 2 or read_generation(run).number == generation.number:
                    raise
        return cls(Path(run), bits, archive, resolve_device(device), backend, verify)

    # ------------------------------------------------------------------------------------------ queries
    @property
    def heads(self):
        return self.coder.heads

    def model_key(self) -> tuple:
        return self.coder.model_key()

    def share_model(self, other: Index) -> None:
        """Use `other`'s heads and encoders (loaded once, in memory once, for several archives of one model)."""
        if self.model_key() != other.model_key():
            raise DuchError(f"{self.run} and {other.run} were coded by different models; each needs its own")
        self.coder.share(other.coder)

    def embed_text(self, texts: list[str]) -> np.ndarray:
        return self.coder.embed_text(texts)

    def embed_image(self, paths: list[str | Path]) -> np.ndarray:
        return self.coder.embed_image(paths)

    def embed_images(self, images: list[tuple[str, Image.Image]]) -> np.ndarray:
        return self.coder.embed_images(images)

    def item(self, item_id: str) -> tuple[str, int]:
        """(modality, row) of an archive id: an image id, or IMAGE_ID#CAPTION_INDEX for a caption."""
        modality = "text" if "#" in item_id and "text" in self.tables else "image"
        row = self.tables[modality].row_of.get(item_id)
        if row is not None and self.archive.removed[modality][row]:
            raise DuchError(f"--id {item_id!r} was removed from the archive (`duch remove`)")
        if row is None:
            raise DuchError(f"--id {shown(item_id)} is not in the archive (image ids look like "
                            f"{self.tables['image'].meta['ids'][0]!r}, captions like IMAGE_ID#0)")
        return modality, row

    # ------------------------------------------------------------------------------------------ search
    def search_codes(self, codes: np.ndarray, modality: str, k: int,
                     within: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Packed query codes [Q, K/8] -> ([Q, k] distances, [Q, k] rows) over `modality`'s codes: exact, ties
        in archive order, whichever backend runs (each is tested equal to the numpy scan). `within`: the only rows
        to consider (ascending), scanned exactly whatever the backend, so that a filter never shrinks k."""
        codes = np.asarray(codes, np.uint8)
        removed = self.archive.removed.get(modality)
        if within is not None:
            return self._search_within(codes, modality, k, within[~removed[within]] if removed is not None else within)
        gone = self.archive.removed_count.get(modality, 0)
        if gone:  # the top k + (items removed) holds the top k of the live ones: ask for that many, drop the rest
            d, rows = self._search_all(codes, modality, k + gone)
            keep = ~removed[rows]
            return (np.stack([r[m][:k] for r, m in zip(d, keep)]), np.stack([r[m][:k] for r, m in zip(rows, keep)]))
        return self._search_all(codes, modality, k)

    def _search_all(self, codes: np.ndarray, modality: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        backend = self._backend(modality)
        if isinstance(backend, torch.Tensor):
            return self._gpu_topk(codes, backend, k)
        if backend is not None:  # faiss: flat gives the numpy scan's rows, faster on batches; ivf/hnsw approximate
            d, rows = backend.search(codes, min(k, len(self.tables[modality])))
            if (rows < 0).any():  # an approximate index may find fewer than k
                found = (rows >= 0).all(axis=0)
                d, rows = d[:, found], rows[:, found]
            return d.astype(np.int32), rows.astype(np.int64)
        return hamming_topk(codes, self.tables[modality].codes, k)

    def _gpu_topk(self, codes: np.ndarray, words: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """GPU: the Triton kernel over int32 words, or the torch scan over int64 words."""
        if words.dtype == torch.int32:
            d, rows = hamming_topk_triton(codes, words, k)
        else:
            d, rows = hamming_topk_torch(to_int64_words(codes, self.device), words, k)
        return d.cpu().numpy(), rows.cpu().numpy()

    def _search_within(self, codes: np.ndarray, modality: str, k: int,
                       within: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        backend = self._backend(modality)
        if isinstance(backend, torch.Tensor):  # the subset's words gathered on the GPU, then the same scan
            d, rows = self._gpu_topk(codes, backend[torch.as_tensor(within, device=self.device)].contiguous(), k)
        else:
            d, rows = hamming_topk(codes, np.asarray(self.tables[modality].codes[within]), k)
        return d, within[rows]

    def rows_where(self, modality: str, mask: np.ndarray | None) -> np.ndarray | None:
        """A filter as the ascending rows it lets through (None: no filter); `mask` is [N] bool over the rows."""
        if mask is None:
            return None
        mask = np.asarray(mask, bool)
        if mask.shape != (len(self._table(modality)),):
            raise DuchError(f"a filter over {modality} items needs one value per item "
                            f"({len(self._table(modality))}), got {mask.shape}")
        return np.flatnonzero(mask)

    def _backend(self, modality: str):
        """Built once per modality: the codes on the GPU, or a faiss index in memory, or None (numpy scan over
        the memory-mapped file)."""
        if modality in self._backends:
            return self._backends[modality]
        table = self._table(modality)
        backend = None
        if self.device.type == "cuda":
            # One copy at packed size: the kernel's int32 words (viewed as int64 where it needs them), or the
            # int64 words of the torch scan where Triton is missing.
            words = to_int32_words if gpu_kernel_available(self.device) else to_int64_words
            backend = words(table.codes[:], self.device)
        elif self.backend in ("auto", "faiss") and (index_file := self._index_file(modality)):
            from duch.pipeline.formats import faiss_index

            backend = faiss_index.read(index_file)
        elif self.backend in ("auto", "faiss"):
            from duch.pipeline.formats import faiss_index

            if self.backend == "faiss" or faiss_index.installed():  # "faiss" without it: the install hint
                backend = faiss_index.build(table.codes, "flat")
        self._backends[modality] = backend
        return backend

    def search(self, text: str | None = None, image: str | Path | None = None, id: str | None = None, k: int = 10,
               modality: str | None = None, rerank_top: int = 0, ties: str = "adaptive",
               where: np.ndarray | None = None) -> list[Hit]:
        """Top-k archive items for one query. `modality`: what to return, by default the other modality than
        the query's (images when the archive holds no captions). `rerank_top`: re-rank that many by cosine.
        `ties`: equal distances by the query's confidence ("adaptive"; in archive order for an --id query whose
        continuous outputs were not stored) or in archive order ("order"). `where`: [N] bool over the returned
        modality's rows, a filter applied before the top k (it never shrinks k below the items it lets
        through)."""
        if ties not in TIES:
            raise DuchError(f"ties must be one of {', '.join(TIES)}, got {ties!r}")
        if k < 1 or rerank_top < 0:
            raise DuchError(f"k must be at least 1 and rerank_top 0 or more, got k={k}, rerank_top={rerank_top}")
        given = [q for q in (text, image, id) if q is not None]
        if len(given) != 1:
            raise DuchError("give exactly one query: text, image or id")
        if text is not None:
            query = Query.of("text", self.embed_text([text])[0])
        elif image is not None:
            query = Query.of("image", self.embed_image([image])[0])
        else:
            query = self.id_query(id)
        return self.rank(query, k, modality, rerank_top, ties, where)

    def id_query(self, item_id: str) -> Query:
        """An archive item as a query: its stored code (and continuous outputs, when stored)."""
        source, row = self.item(item_id)
        table = self.tables[source]
        h = None if table.continuous is None else table.continuous[row].astype(np.float32)
        return Query(source, np.asarray(table.codes[row:row + 1]), h)

    def target(self, query: Query, modality: str | None) -> str:
        """What a query returns: `modality`, or by default the other modality than its own."""
        return modality or ("image" if query.source == "text" or "text" not in self.tables else "text")

    def rank(self, query: Query, k: int = 10, modality: str | None = None, rerank_top: int = 0,
             ties: str = "adaptive", where: np.ndarray | None = None) -> list[Hit]:
        """The top k for a query already coded (`search`'s second half; a service codes many at once)."""
        if ties not in TIES:
            raise DuchError(f"ties must be one of {', '.join(TIES)}, got {ties!r}")
        target, packed, h = self.target(query, modality), query.packed, query.continuous
        within = self.rows_where(target, where)
        scores = None
        if ties == "adaptive" and h is not None and not rerank_top:
            scan = lambda n: tuple(a[0] for a in self.search_codes(packed, target, n, within))  # noqa: E731
            distances, rows, scores = adaptive_topk(scan, self._table(target).codes, h, k)
        else:
            distances, rows = (a[0] for a in self.search_codes(packed, target, max(k, rerank_top), within))
        if rerank_top:
            table = self._table(target)
            if table.continuous is None or h is None:
                raise DuchError("--rerank needs the continuous outputs: rerun `duch encode-archive --continuous "
                                "--force`")
            order, all_scores = rerank(h, np.asarray(table.continuous[rows]))
            distances, rows, scores = distances[order], rows[order], all_scores[order]
        return [self._hit(rank, target, int(r), int(d), None if scores is None else float(scores[rank]))
                for rank, (r, d) in enumerate(zip(rows[:k], distances[:k]))]

    def _index_file(self, modality: str) -> Path | None:
        """The faiss index over the whole archive for this code length and modality, if one was written: by
        `encode-archive --index` (a file of its folder only, whatever name its manifest gives), or for an archive
        grown by `duch add`, the generation's own (pipeline/archive/growth.py)."""
        generation = self.archive.generation
        if generation.segments != (BASE,):
            listed = generation.indexes.get(str(self.bits), {}).get(modality)
            return verify_generation_index(self.run, listed, self.verify) if listed else None
        files = ((self.manifest.get("index") or {}).get("files") or {}).get(str(self.bits), {})
        if modality not in files:
            return None
        stage = stage_dir(self.run, "encode-archive")
        stage_file(stage, files[modality])  # a name leading out of the folder is refused before anything else
        return verify_listed(stage, self.manifest, files[modality], checksum=self.verify)

    def _table(self, modality: str) -> CodeTable:
        if modality not in self.tables:
            raise DuchError(f"the archive holds no {modality} codes (it was extracted without captions)")
        return self.tables[modality]

    @property
    def images_dir(self) -> Path:
        """The images folder of the run's own archive (segments added later have theirs: image_path)."""
        return self.archive.images_dirs[0]

    def image_path(self, row: int) -> Path:
        """The file of the image at `row`, in its segment's images folder."""
        return self.archive.image_path(row)

    def _hit(self, rank: int, modality: str, row: int, distance: int, score: float | None) -> Hit:
        meta = self.tables[modality].meta
        place = None
        if modality == "image":
            image_id, item_id, caption = str(meta["ids"][row]), str(meta["ids"][row]), None
            label, path = str(meta["label"][row]) or None, str(self.image_path(row))
            place = place_of(self.tables[modality], row)
        else:
            image_id = str(meta["image_id"][row])
            item_id, caption = caption_key(image_id, meta["caption_index"][row]), str(meta["text"][row])
            image_row = self.tables["image"].row_of.get(image_id)
            images = self.tables["image"].meta
            label = (str(images["label"][image_row]) or None) if image_row is not None else None
            path = str(self.image_path(image_row)) if image_row is not None else None
        return Hit(rank + 1, modality, row, item_id, image_id, distance, score, label, path, caption, place)


def load_encode_manifest(run: str | Path) -> tuple[Path, dict]:
    """The folder and manifest of a run's finished encode-archive stage."""
    out_dir = stage_dir(run, "encode-archive")
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise DuchError(f"{run}: no finished encode-archive stage; run `duch encode-archive --run {run}` first")
    return out_dir, manifest

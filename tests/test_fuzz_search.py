"""Fuzzing the search query path a user (or the search service) reaches: `Index.search` with caption text of any
length and content, image files of any bytes, ids, k and re-rank sizes, on a tiny real encoded archive. Property
(tests/fuzzkit.py): hits (at most k, nearest first, each an archive item) or one DuchError line; never another
exception, a hang, or memory beyond the bound (a 50-million-character query: bench/fuzz_bounds.py)."""
from __future__ import annotations

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from duch.pipeline import DuchError
from duch.pipeline.retrieval.search import Index

from .fuzzkit import caption_text, examples, one_line, time_bound
from .test_fuzz_images import headers, mutated

pytestmark = pytest.mark.fuzz

BITS = 16


@pytest.fixture(scope="module")
def index(encoded_run) -> Index:
    return Index.load(encoded_run, bits=BITS, device="cpu")  # search writes nothing: no copy needed


def check_hits(index: Index, k: int, **query) -> None:
    try:
        with time_bound(30):
            hits = index.search(k=k, **query)
    except DuchError as e:
        event(f"refused: {one_line(e)[:40]}")
        return
    event("answered")
    assert k >= 1 and 0 < len(hits) <= k
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    assert all(0 <= h.distance <= BITS for h in hits)
    assert [h.distance for h in hits] == sorted(h.distance for h in hits) or query.get("rerank_top")
    for hit in hits:
        table = index.tables[hit.modality]
        assert 0 <= hit.row < len(table) and table.row_of[hit.id] == hit.row


ks = st.sampled_from([*range(1, 41), 100, 0, -1])
reranks = st.sampled_from([0] * 10 + [1, 5, 48, 100, -1])


@examples("query-text")
@given(text=caption_text, k=ks, rerank=reranks, modality=st.sampled_from([None, "image", "text"]))
def test_caption_queries_fuzzed(index, text, k, rerank, modality):
    check_hits(index, k, text=text, rerank_top=rerank, modality=modality)


@examples("query-image")
@given(data=st.one_of(mutated(), headers, st.binary(max_size=40)), suffix=st.sampled_from([".jpg", ".png", ".tif"]),
       k=ks)
def test_image_queries_fuzzed(index, tmp_path_factory, data, suffix, k):
    path = tmp_path_factory.mktemp("query", numbered=True) / f"query{suffix}"
    path.write_bytes(data)
    check_hits(index, k, image=path)


real_ids = st.sampled_from([str(i) for i in range(24)] + [f"{i}#{c}" for i in range(24) for c in (0, 1)])


@examples("query-id")
@given(item=st.one_of(real_ids, real_ids, real_ids, st.sampled_from(["7#2", "#", "0#", "0#x", "0#-1", "0 ", "00"]),
                      caption_text),
       k=ks, rerank=reranks)
def test_id_queries_fuzzed(index, item, k, rerank):
    check_hits(index, k, id=item, rerank_top=rerank)

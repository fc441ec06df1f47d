"""What the fuzzers share: hypothesis profiles, strategies for a user's text and files, the property every reader
must keep, and a bound on the time one example may take.

The property (issue 24): an input is either accepted, and what the reader gives back is what the later stages can
store and read (HDF5 strings, the caption rules of data/text.py), or it is refused with one line, a DatasetError or
DuchError naming the item, the reason and the fix. Never another exception, a hang or a memory blow-up.

CI runs every fuzzer with a fixed seed (the "ci" profile: derandomized) and a bounded number of examples per
reader, listed in EXAMPLES. A longer local hunt multiplies them and draws a fresh seed:

    DUCH_FUZZ_SCALE=50 python -m pytest -m fuzz --hypothesis-seed=random
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import string

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

SCALE = int(os.environ.get("DUCH_FUZZ_SCALE", "1"))
settings.register_profile("ci", derandomize=True, deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz", derandomize=False, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("fuzz" if SCALE > 1 else "ci")

# Examples per fuzzer in CI (x DUCH_FUZZ_SCALE locally); the closing note of issue 24 quotes them.
EXAMPLES = {
    "caption-json": 150, "caption-json-bytes": 80, "jsonl": 100, "csv": 120, "folder": 40, "image": 200,
    "image-header": 120, "manifest": 80, "codes": 40, "checkpoint": 60, "weights": 40, "set": 200, "set-train": 25,
    "checkpoint-resume": 8, "extract": 8,
    "stretch": 150, "query-text": 60, "query-image": 40, "query-id": 60,
}


def examples(reader: str) -> settings:
    return settings(max_examples=EXAMPLES[reader] * SCALE)


@contextlib.contextmanager
def time_bound(seconds: float):
    """Fail an example that runs longer than `seconds` (a hang), from a timer signal: the main thread only."""
    def expired(*_):
        raise TimeoutError(f"one example ran longer than {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_line(error: Exception, *names: str) -> str:
    """A refusal as a user sees it: one line, naming what it is about."""
    message = str(error)
    assert message and "\n" not in message and "\r" not in message, repr(message)
    for name in names:
        assert name in message, (name, message)
    return message


# ---------------------------------------------------------------------------------------------- strategies
# Every character class a scraped caption can hold: letters, controls (NUL included), lone surrogates (JSON's
# "\ud800" escapes), private use, format characters, whitespace of every kind.
any_char = st.characters(codec=None, exclude_categories=())
odd_chars = st.sampled_from(["\x00", "\x01", "\x1b", "\x7f", "\x85", "\x9f", "\t", "\n", "\r", "\u2028", "\ufeff",
                             "\u200b", "\ud800", "\udfff", "\U0010ffff", " ", "\u00a0", "\\", '"', ",", ";"])
words = st.text(string.ascii_letters + "  ", min_size=0, max_size=40)


@st.composite
def long_text(draw):
    """Up to ~300k characters, cheap to draw: a short piece repeated."""
    piece = draw(st.text(alphabet=st.one_of(any_char, odd_chars), min_size=1, max_size=6))
    return piece * draw(st.integers(1, 50_000))


caption_text = st.one_of(
    words,
    st.text(alphabet=st.one_of(any_char, odd_chars), max_size=30),
    st.builds(lambda a, c, b: a + c + b, words, odd_chars, words),
    long_text(),
)

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), caption_text, st.just([]), st.just({}))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(  # empty containers are among the scalars
    st.lists(inner, min_size=1, max_size=4), st.dictionaries(st.text(max_size=8), inner, min_size=1, max_size=4)),
    max_leaves=12)


def _places(tree) -> list[tuple]:
    """(container, key) of every value in a JSON tree, the root excepted."""
    out = []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        out.append((tree, key))
        out += _places(value)
    return out


@st.composite
def mutated_json(draw, doc):
    """`doc` (a JSON tree, copied) with one to three values deleted or replaced by any JSON value."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        places = _places(doc)
        if not places:
            break
        container, key = draw(st.sampled_from(places))
        if draw(st.booleans()):
            del container[key]
        else:
            container[key] = draw(json_values)
    return doc

"""Fuzzing `train-hash --set KEY=VALUE` (pipeline/config/fields.parse_overrides, then TrainConfig.validate) as the
CLI builds a config from it. Property (tests/fuzzkit.py): the settings are refused in one line naming the setting,
or they are accepted and a short training on a tiny real archive runs to its end with them."""
from __future__ import annotations

import dataclasses
import shutil

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from duch.pipeline import DuchError
from duch.pipeline.config import TrainConfig, parse_overrides
from duch.stages.train_hash import train_hash

from .fuzzkit import any_char, examples, one_line, time_bound

pytestmark = pytest.mark.fuzz

OWN_OPTIONS = ("bits", "split", "epochs", "batch_size", "hidden", "tau", "seed", "precision", "reference_quirks")
KEYS = sorted(f.name for f in dataclasses.fields(TrainConfig))
TINY = dict(bits=(8,), epochs=2, hidden=16, batch_size=8, eval_every=1, checkpoint_every=0, device="cpu",
            precision="fp32")

numbers = st.one_of(st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True, width=32),
                    st.sampled_from(["1e309", "-0.0", "nan", "inf", "1e-320", "10**9", "9" * 5000, "0x10", "1_000"]))
values = st.one_of(
    numbers.map(str),
    st.lists(numbers, max_size=3).map(lambda v: ",".join(map(str, v))),
    st.lists(numbers, max_size=3).map(lambda v: str(tuple(v))),
    st.sampled_from(["true", "False", "yes", "off", "None", "''", "[]", "()", "{}", "[[[[[1]]]]]",
                     "(" * 200 + ")" * 200,
                     "1" + "+1" * 500, "'a'", "b''", "\x00", "lambda: 0", "__import__('os')"]),
    st.text(alphabet=any_char, max_size=12),
)
items = st.builds(lambda key, sep, value: f"{key}{sep}{value}", st.one_of(st.sampled_from(KEYS), st.text(max_size=6)),
                  st.sampled_from(["=", "=", "=", " = ", ""]), values)


def settings_of(overrides: list[str]) -> TrainConfig | None:
    """The CLI's way from --set to a validated config, or None for a refusal in one line naming the setting."""
    try:
        given_ = parse_overrides(overrides, TrainConfig, reserved=OWN_OPTIONS)
        cfg = TrainConfig.recipe("duch", run="run", **{**TINY, **given_})
        cfg.validate()
        return cfg
    except DuchError as e:
        event("refused")
        one_line(e)
        assert any(item.split("=")[0].strip().replace("-", "_") in str(e) for item in overrides) or "`" in str(e), e
        return None


@examples("set")
@given(overrides=st.lists(items, min_size=1, max_size=3))
def test_set_values_fuzzed(overrides):
    with time_bound(10):
        settings_of(overrides)


@pytest.fixture(scope="module")
def tiny_run(tiny_extract_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("set-run") / "run"
    shutil.copytree(tiny_extract_run, run)
    return run


@pytest.mark.slow
@examples("set-train")
@given(overrides=st.lists(st.builds(lambda key, value: f"{key}={value}", st.sampled_from(
    [k for k in KEYS if k not in OWN_OPTIONS and k not in TrainConfig.RUNTIME_FIELDS]), values), min_size=1,
    max_size=2))
def test_accepted_set_values_train_to_the_end(tiny_run, overrides):
    cfg = settings_of(overrides)
    if cfg is None:
        return
    event("accepted: trained")
    try:
        with time_bound(60):
            train_hash(dataclasses.replace(cfg, run=str(tiny_run)), force=True, progress=False, echo=lambda _: None)
    except DuchError as e:  # the documented refusals at run time (a loss gone NaN names the setting to lower)
        event(f"refused at run time: {one_line(e)[:40]}")

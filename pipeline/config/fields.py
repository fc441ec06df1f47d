"""What every stage config shares: the fields that decide a stage's bytes, `--set KEY=VALUE`, the recorded form.

A config is a dataclass. `RUNTIME_FIELDS` name the fields that only say how the work runs (device, batch size,
workers, scheduler): they never change an output byte, so they stay out of the fingerprint.
"""
from __future__ import annotations

import ast
import dataclasses

from duch.pipeline import DuchError


def output_settings(cfg, also_drop: tuple[str, ...] = ()) -> dict:
    """The fields that decide the bytes a stage writes: the basis of its fingerprint."""
    out = dataclasses.asdict(cfg)
    for name in (*cfg.RUNTIME_FIELDS, *also_drop):
        out.pop(name, None)
    return out


def parse_overrides(items, cls, reserved: tuple[str, ...] = ()) -> dict:
    """`KEY=VALUE` strings (`--set`) as fields of the dataclass `cls`: each value a Python literal of its field's
    type (an int where a float is wanted, a comma list or one number for a tuple). `reserved`: fields that have
    options of their own, named in the error instead."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    runtime = getattr(cls, "RUNTIME_FIELDS", ())
    out = {}
    for given in items:
        key, sep, text = given.partition("=")
        item = given if given.isprintable() else repr(given)  # as messages show it: one line, whatever it holds
        key = key.strip().replace("-", "_")
        if key in reserved:
            raise DuchError(f"`overrides` {item}: use `{key}` instead")
        if not sep or key not in fields or key in runtime:
            names = sorted(set(fields) - set(runtime) - set(reserved))
            raise DuchError(f"`overrides` {item}: {cls.__name__} has no such setting; give KEY=VALUE with KEY one of "
                            f"{', '.join(names)}")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        out[key] = _as_field_type(item, value, _field_default(fields[key]))
    return out


def _field_default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _as_field_type(item: str, value, default):
    kind = type(default)
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        return value.lower() in ("true", "yes", "on")
    if default is None or (kind is float and type(value) in (int, float)) or (kind is type(value)):
        return float(value) if kind is float else value
    if kind is tuple and isinstance(value, (list, int, float)):
        return tuple(value) if isinstance(value, list) else (value,)
    article = "an" if kind.__name__[0] in "aeiou" else "a"
    raise DuchError(f"`overrides` {item}: takes {article} {kind.__name__} (like {default!r}), not {value!r}")


def manifest_config(cfg) -> dict:
    """The config a manifest records: all of it but where the work ran (recorded apart, under "execution"), so a
    run on a cluster and one in-process leave the same manifest but for timings."""
    out = dataclasses.asdict(cfg)
    out.pop("scheduler", None)
    return out


def check_scheduler(text: str) -> None:
    from duch.pipeline.compute.cluster import SchedulerSpec

    SchedulerSpec.parse(text)


def check_device(device: str) -> None:
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise DuchError(f"`device` must be auto, cpu or cuda[:N], got {device!r}")


def check_cluster(scheduler: str, threads: int | None) -> None:
    """--scheduler and --threads, as every stage that runs one task per shard takes them."""
    check_scheduler(scheduler)
    if threads is not None and threads < 1:
        raise DuchError(f"`threads` must be at least 1, got {threads}")

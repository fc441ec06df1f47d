"""What the commands share: the options read from the config dataclasses, the one-line user errors, the progress
lines spelled as options."""
from __future__ import annotations

import dataclasses
import functools
import sys

import click

from duch.data import DatasetError
from duch.pipeline import DuchError
from duch.pipeline.errors import spelled


def user_errors(fn):
    """A mistake a user can fix is one line on stderr and exit code 2, never a traceback. A full disk or a folder
    without write permission is one of those, wherever the write happened (pipeline.storage words it)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from duch.pipeline.run.storage import storage_error

        try:
            return fn(*args, **kwargs)
        except (DuchError, DatasetError, OSError) as e:
            message = storage_error(e) if isinstance(e, OSError) else e
            if message is None:
                raise
            click.echo(f"error: {spelled(str(message), 'cli')}", err=True)
            sys.exit(2)

    return wrapper


def say(line: str) -> None:  # a stage's progress line, its parameters spelled as options
    click.echo(spelled(line, "cli"))

def option(config: type, name: str, *decls: str, **kwargs):
    """The option of `config`'s field `name` (`--name` unless `decls` say otherwise), its default (and so its type)
    read from the dataclass, the one place a default is written: a tuple as the comma list `ints` parses back;
    shown in --help unless None or empty (the help then says what that means)."""
    default = next(f.default for f in dataclasses.fields(config) if f.name == name)
    default = ",".join(map(str, default)) if isinstance(default, tuple) else default
    kwargs.setdefault("show_default", default not in (None, ""))
    return click.option(*(decls or (f"--{name.replace('_', '-')}",)), default=default, **kwargs)


def ints(ctx, param, value: str | None, example: str = "16,32,64,128", empty=()) -> tuple[int, ...] | None:
    """A comma list of integers (code lengths unless `example` says otherwise); `empty` when it lists none."""
    try:
        return tuple(int(b) for b in (value or "").split(",") if b.strip()) or empty
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as {example}, got {value!r}") from None


def floats(ctx, param, value: str | None) -> tuple[float, ...]:
    """A comma list of numbers (a lon/lat box)."""
    try:
        return tuple(float(v) for v in (value or "").split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers such as -120.5,37.2,-120.4,37.3, got {value!r}"
                                 ) from None


some_bits = functools.partial(ints, empty=None)  # none given: every code length the run has


def stacked(*decorators):
    """One decorator of several, applied as if written above a function in this order."""
    return lambda fn: functools.reduce(lambda f, d: d(f), reversed(decorators), fn)


device_option = functools.partial(option, name="device", help="auto, cpu, cuda or cuda:N.")  # device_option(Config)
# runtime_option(Config): what runs the frozen encoders (pipeline/encoders/runtime.py)
runtime_option = functools.partial(
    option, name="runtime", type=click.Choice(["auto", "torch", "onnx"]),
    help="What runs the encoders: onnx (ONNX Runtime on the CPU, exported once into ~/.cache/duch; pip install "
         "'duch[onnx]'), torch, or auto (onnx on a CPU where installed, for efficientnet-lite0 and minilm-l6).")
images_option = click.option("--images", type=click.Path(), help="Images folder, when not beside the annotation.")
wait_option = click.option("--wait", default=0.0, show_default=True, metavar="SECONDS",
                           help="When another duch process holds the run, wait up to this long for it.")
progress_option = click.option("--no-progress", is_flag=True, help="No progress bars.")
# What every stage that keeps its outputs takes.
stage_options = stacked(click.option("--force", is_flag=True,
                                     help="Redo the stage even if it is finished or made from other settings."),
                        wait_option, progress_option)


def cluster_options(config: type):
    """--scheduler and --threads, for the stages that run one task per shard (docs/cluster.md)."""
    return stacked(
        option(config, "scheduler",
               help="Where the per-shard tasks run: none (this process), local[:N] (a dask LocalCluster of N worker "
                    "processes, one per GPU by default) or a running dask scheduler's address, tcp://host:8786 "
                    "(outputs must then be on storage every worker reaches; see docs/cluster.md)."),
        option(config, "threads", type=int,
               help="Torch threads per encoding process [default: all cores; on a local cluster, cores / N]. Runs "
                    "compared bit for bit on CPU use the same count."))

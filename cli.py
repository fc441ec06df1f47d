"""duch command line: the `duch` group; its subcommands, thin click wrappers over the Python API, are in commands/."""
from __future__ import annotations

import sys

if __name__ == "__main__":  # `python cli.py ...` runs this checkout, installed or not: its folders are duch's
    import pathlib
    import types

    sys.modules["duch"] = types.ModuleType("duch")
    sys.modules["duch"].__path__ = [str(pathlib.Path(__file__).resolve().parent)]

import click


class OneLineErrors(click.Group):
    """Usage mistakes (a bad option value, a missing option) as one line too, instead of click's usage block."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx else ctx.command_path
            click.echo(f"error: {e.format_message()} (see {where} --help)", err=True)
            sys.exit(2)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """duch: unsupervised contrastive hashing for cross-modal retrieval in remote-sensing archives."""


def _commands():
    from duch.commands import archive, changes, export, search, serve, stac, stages

    for command in (stages.extract, stages.train_hash, stages.encode_archive, stages.evaluate, archive.add,
                    archive.remove, archive.compact, search.search, serve.serve, stac.stac_items, export.export,
                    changes.changes):
        main.add_command(command)


_commands()

if __name__ == "__main__":
    main()

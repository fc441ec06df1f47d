"""The `duch` command's subcommands, a module per role; cli.py gathers them. Thin click wrappers over the
Python API: options read their defaults from the config dataclasses (options.py), errors are one line."""

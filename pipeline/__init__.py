"""Run directories, manifests, configs, HDF5 shard I/O and encoders."""


class DuchError(Exception):
    """An error a user can fix; the CLI prints its message on one line and exits with code 2."""

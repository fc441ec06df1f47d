"""Run directories, manifests, configs, HDF5 shard I/O and encoders."""


from duch.pipeline.errors import DuchError

__all__ = ["DuchError"]

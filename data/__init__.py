"""Dataset readers, image and text loading, and augmentation."""
from duch.data.records import DatasetError, Dataset, Item, Reject
from duch.data.readers import read_dataset

__all__ = ["DatasetError", "Dataset", "Item", "Reject", "read_dataset"]

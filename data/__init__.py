"""Dataset readers, image and text loading, and augmentation."""
from duch.data.readers import read_dataset
from duch.data.records import Dataset, DatasetError, Item, Reject

__all__ = ["DatasetError", "Dataset", "Item", "Reject", "read_dataset"]

"""Data for the federation engine: image data sets from local files and client partitions."""

from federation.data.images import (
    DATASETS,
    DatasetFormatError,
    DatasetNotFoundError,
    ImageArrays,
    as_tensor_dataset,
    load_images,
)
from federation.data.partition import (
    PARTITIONERS,
    PartitionError,
    client_test_indices,
    label_histogram,
    partition,
)

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "ImageArrays",
    "PartitionError",
    "as_tensor_dataset",
    "client_test_indices",
    "label_histogram",
    "load_images",
    "partition",
]

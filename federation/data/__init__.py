"""Data for the federation engine: image data sets and patch bags as client data.

``load_client_data(config, clients)`` builds the ``ClientData`` of the clients a process
runs, with the loader ``federation.catalog.CLIENT_DATA`` names for ``config.data.name``: the
image benchmarks (partitioned in memory) or ``bags`` (one hospital per client).
"""

from __future__ import annotations

from collections.abc import Iterable

from federation import catalog
from federation.config import FederationConfig
from federation.data.base import Batch, ClientData
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


def load_client_data(config: FederationConfig, clients: Iterable[int]) -> dict[int, ClientData]:
    """The ``ClientData`` of ``clients`` for the data set ``config.data.name``."""
    return dict(catalog.CLIENT_DATA[config.data.name](config, clients))


__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "Batch",
    "ClientData",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "ImageArrays",
    "PartitionError",
    "as_tensor_dataset",
    "client_test_indices",
    "label_histogram",
    "load_client_data",
    "load_images",
    "partition",
]

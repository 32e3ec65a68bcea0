"""Data for the federation engine: image data sets and patch bags as client data.

``load_client_data(config, clients)`` builds the ``ClientData`` of the clients a process
runs, with the loader registered under ``config.data.name`` in ``DATA_LOADERS``: the image
benchmarks (partitioned in memory) and ``bags`` (one hospital per client).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from federation.config import FederationConfig
from federation.data.base import Batch, ClientData
from federation.data.image_clients import load_image_clients
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
from federation.data.slides import load_slide_clients

Loader = Callable[[FederationConfig, Iterable[int]], Mapping[int, ClientData]]

DATA_LOADERS: dict[str, Loader] = {
    **{name: load_image_clients for name in DATASETS},
    "bags": load_slide_clients,
}


def load_client_data(config: FederationConfig, clients: Iterable[int]) -> dict[int, ClientData]:
    """The ``ClientData`` of ``clients`` for the data set ``config.data.name``."""
    return dict(DATA_LOADERS[config.data.name](config, clients))


__all__ = [
    "DATASETS",
    "DATA_LOADERS",
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

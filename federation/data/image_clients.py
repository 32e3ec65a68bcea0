"""Image benchmarks (MNIST, Fashion-MNIST, CIFAR-10) as client data: partitions in memory.

Every process computes the whole partition (cheap, and the same everywhere because it is
seeded from the run seed alone) and materialises tensors only for the clients it runs. Each
client's test set follows its training label distribution (``client_test_indices``, as in
ProxyFL's evaluation), or with ``data.test_distribution: global`` the test split's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from federation.audit.records import Records, read_audit_records, write_audit_records
from federation.config import FederationConfig
from federation.data.base import Batch, ClientData
from federation.data.images import ImageArrays, as_tensor_dataset, load_images
from federation.data.partition import (
    client_test_indices,
    draw_canaries,
    holdout_indices,
    label_histogram,
    partition,
)
from federation.run_files import AUDIT_RECORDS, HOSPITALS
from federation.seeds import derive_seed

log = logging.getLogger(__name__)

# Test sets are scored in chunks of this many images: one or two forward passes for the
# benchmarks, bounded memory for larger models.
_EVAL_CHUNK = 2048


def chunked_logits(module: nn.Module, records: TensorDataset
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(logits, labels)`` of ``records`` (images, labels) under ``module``, a chunk of
    images per forward pass, on the module's device; the caller sets the mode and no_grad."""
    device = next(module.parameters()).device
    inputs, labels = records.tensors
    for start in range(0, len(labels), _EVAL_CHUNK):
        yield (module(inputs[start:start + _EVAL_CHUNK].to(device)),
               labels[start:start + _EVAL_CHUNK].to(device))


class ImageClientData(ClientData):
    """One client's training and test images as normalised in-memory tensors; one image is
    one privacy unit."""

    unit = "record"
    eval_split = "test"

    def __init__(self, name: str, train: TensorDataset, test: TensorDataset, *,
                 num_classes: int, dataset: str, mean: tuple[float, ...],
                 std: tuple[float, ...],
                 audit_records: Records | None = None) -> None:
        self.name = name
        self.train, self.test = train, test
        # The audit's members and non-members by set (indices into the training split, and
        # labels), when the run sets records aside for it (``config.AuditConfig``).
        self.audit_records = audit_records
        self.num_classes = num_classes
        self._dataset, self._mean, self._std = dataset, mean, std

    @property
    def num_units(self) -> int:
        return len(self.train)

    def model_options(self) -> dict[str, Any]:
        _, channels, height, width = self.train.tensors[0].shape
        if height != width:
            raise ValueError(f"{self._dataset}: images are {height}x{width}; models expect "
                             "square images")
        return {"in_channels": int(channels), "image_size": int(height)}

    def epoch(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        inputs, labels = self.train.tensors
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            yield Batch(inputs[index], labels[index])

    def sampled(self, unit_batches: Iterable[list[int]], generator: torch.Generator
                ) -> Iterator[Batch]:
        inputs, labels = self.train.tensors
        for indices in unit_batches:
            index = torch.as_tensor(indices, dtype=torch.int64)
            yield Batch(inputs[index], labels[index])

    @torch.no_grad()
    def evaluate(self, module: nn.Module) -> dict[str, float]:
        """Accuracy and mean cross-entropy on the test set, in as few passes as fit memory."""
        module.eval()
        correct, loss = 0, 0.0
        for logits, y in chunked_logits(module, self.test):
            correct += int((logits.argmax(1) == y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
        module.train()
        return {"accuracy": correct / len(self.test), "loss": loss / len(self.test)}

    def write_records(self, directory: Path) -> None:
        """The audit's members and non-members (``audit_records.csv``), if any."""
        if self.audit_records is None:
            return
        write_audit_records(directory / AUDIT_RECORDS, self.name, self.audit_records)

    def describe(self) -> dict[str, Any]:
        return {"kind": "images", "dataset": self._dataset, **self.model_options(),
                "normalisation": {"mean": list(self._mean), "std": list(self._std)}}


def load_image_clients(config: FederationConfig, clients: Iterable[int]
                       ) -> dict[int, ImageClientData]:
    """Partition ``config.data`` over ``config.clients`` clients; the data of ``clients``."""
    spec = config.data
    train = load_images(spec.name, spec.root, train=True)
    test = load_images(spec.name, spec.root, train=False)
    scheme_options: dict[str, dict[str, float]] = {
        "class_skew": {"p_major": spec.p_major},
        "dirichlet": {"alpha": spec.alpha},
    }
    options = scheme_options.get(spec.partition, {})
    rng = np.random.default_rng(derive_seed(config.seed, "partition"))
    parts = partition(train.labels, config.clients, spec.partition, spec.samples_per_client,
                      rng, **options)
    histogram = label_histogram(train.labels, parts, train.num_classes)
    test_distributions = histogram
    if spec.test_distribution == "global":
        frequencies = np.bincount(test.labels, minlength=test.num_classes)
        test_distributions = np.tile(frequencies, (config.clients, 1))
    test_rng = np.random.default_rng(derive_seed(config.seed, "test"))
    tests = client_test_indices(test.labels, test_distributions, spec.test_samples_per_client,
                                test_rng)
    for client, counts in enumerate(histogram):
        log.debug("client %d: %d training images, classes %s", client, counts.sum(),
                  counts.tolist())
    if config.audit.shadow_of:
        parts, records = _shadow_parts(config, train.labels, parts, clients)
    else:
        records = _audit_records(config, train.labels, parts)
    return {
        c: ImageClientData(config.client_name(c), _training_set(train, parts[c], records[c]),
                           as_tensor_dataset(test, tests[c]),
                           num_classes=train.num_classes, dataset=spec.name, mean=train.mean,
                           std=train.std, audit_records=records[c] or None)
        for c in clients
    }


def _audit_records(config: FederationConfig, labels: np.ndarray, parts: list[np.ndarray]
                   ) -> list[Records]:
    """Each client's records set aside for the audit (``audit.holdout``, ``audit.canaries``),
    each draw with a seed of its own, so the partition and the test sets stay as they are."""
    records: list[Records] = [{} for _ in parts]
    held: list[np.ndarray] = []
    if config.audit.holdout:
        held = holdout_indices(labels, parts, config.audit.holdout, np.random.default_rng(
            derive_seed(config.seed, "audit-holdout")))
        for c, part in enumerate(parts):
            records[c]["holdout"] = {"member": (part, labels[part]),
                                     "nonmember": (held[c], labels[held[c]])}
    if config.audit.canaries:
        canaries = draw_canaries(labels, [*parts, *held], len(parts), config.audit.canaries,
                                 np.random.default_rng(derive_seed(config.seed,
                                                                   "audit-canaries")))
        for c, drawn in enumerate(canaries):
            records[c]["canary"] = drawn
    return records


def _shadow_parts(config: FederationConfig, labels: np.ndarray, parts: list[np.ndarray],
                  clients: Iterable[int]) -> tuple[list[np.ndarray], list[Records]]:
    """A LiRA shadow run's shards (``audit.shadow_of``): for each client of this process,
    ``data.samples_per_client`` of the target run's holdout members and non-members, and as
    many of its canaries (with their wrong labels) as it trained on, each drawn at random;
    and the records saying which were drawn."""
    parts, records = list(parts), [{} for _ in parts]
    for c in clients:
        path = (Path(config.audit.shadow_of) / HOSPITALS / config.client_name(c)
                / AUDIT_RECORDS)
        target = read_audit_records(path)
        if "holdout" not in target:
            raise ValueError(f"{path}: no holdout records for a shadow run to draw from")
        rng = np.random.default_rng(derive_seed(config.seed, "audit-shadow", c))
        sizes = {"holdout": len(parts[c])}
        if "canary" in target:
            sizes["canary"] = len(target["canary"]["member"][0])
        for kind, size in sizes.items():
            pool, pool_labels = (np.concatenate([target[kind][m][i] for m in target[kind]])
                                 for i in (0, 1))
            drawn = np.zeros(len(pool), dtype=bool)
            drawn[rng.choice(len(pool), size=size, replace=False)] = True
            records[c][kind] = {"member": (pool[drawn], pool_labels[drawn]),
                                "nonmember": (pool[~drawn], pool_labels[~drawn])}
        parts[c] = np.sort(records[c]["holdout"]["member"][0])
        records[c]["holdout"]["member"] = (parts[c], labels[parts[c]])
    return parts, records


def _training_set(train: ImageArrays, part: np.ndarray, records: Records) -> TensorDataset:
    """The client's shard, and its member canaries with their wrong labels when it has some."""
    shard = as_tensor_dataset(train, part)
    if "canary" not in records:
        return shard
    indices, wrong = records["canary"]["member"]
    canaries = as_tensor_dataset(train, indices)
    labels = torch.from_numpy(wrong).to(shard.tensors[1].dtype)
    return TensorDataset(torch.cat([shard.tensors[0], canaries.tensors[0]]),
                         torch.cat([shard.tensors[1], labels]))

"""Split a labelled data set into disjoint client shards, and draw matching client test sets.

Schemes, found by name in ``PARTITIONERS`` (``federation.catalog``):

- ``iid``: a uniform random split.
- ``class_skew``: client ``k`` has a major class; a fraction ``p_major`` of its samples come
  from it and the rest equally from every other class. This is the class non-IID setting of
  ProxyFL (Kalra et al., "Decentralized federated learning through proxy model sharing",
  Nature Communications 14:2899, 2023, arXiv:2111.11343), where 8 clients with 1k images
  (3k for CIFAR-10) each use ``p_major = 0.8``.
- ``dirichlet``: client ``k``'s class proportions are ``q_k ~ Dir(alpha * p)``, ``p`` the
  data set's class distribution (Hsu, Qi & Brown, "Measuring the effects of non-identical data
  distribution for federated visual classification", arXiv:1909.06335, 2019).

Every scheme samples without replacement, so shards are disjoint, and is driven by the
``numpy.random.Generator`` it is given. A request that cannot be met raises
``PartitionError`` with a one-line message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from federation import catalog

log = logging.getLogger(__name__)


class PartitionError(ValueError):
    """A partition or test-set request that the data cannot satisfy. ``str()`` is one line."""


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise PartitionError(
            f"labels must be a non-empty 1-D integer array, got {labels.dtype} {labels.shape}"
        )
    if labels.min() < 0:
        raise PartitionError(f"labels must be non-negative, found {labels.min()}")
    return labels


def _shard_size(labels: np.ndarray, num_clients: int, samples_per_client: int | None) -> int:
    """Samples per client; ``None`` means an equal share of the whole data set."""
    if num_clients < 1:
        raise PartitionError(f"num_clients must be at least 1, got {num_clients}")
    if samples_per_client is None:
        samples_per_client = len(labels) // num_clients
    if samples_per_client < 1:
        raise PartitionError(f"samples_per_client must be at least 1, got {samples_per_client}")
    if num_clients * samples_per_client > len(labels):
        raise PartitionError(
            f"{num_clients} clients x {samples_per_client} samples = "
            f"{num_clients * samples_per_client} > {len(labels)} samples available"
        )
    return samples_per_client


def apportion(total: int, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Integer counts summing to ``total`` in proportion to ``weights`` (largest remainder).

    Each count is within one of ``total * w / sum(w)``; ties between equal remainders are
    broken at random so that no class is favoured by its index. Zero weights get zero.
    """
    weights = np.asarray(weights, dtype=np.float64)
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    remainder = np.where(weights > 0, exact - counts, -1.0)
    shuffled = rng.permutation(len(weights))
    order = shuffled[np.argsort(-remainder[shuffled], kind="stable")]
    counts[order[: total - counts.sum()]] += 1
    return counts


def _draw(labels: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint index arrays, row ``k`` of ``counts`` (K, C) giving client k's count per class."""
    num_classes = counts.shape[1]
    present = np.bincount(labels, minlength=num_classes)
    needed = counts.sum(axis=0)
    short = np.flatnonzero(needed > present[:num_classes])
    if short.size:
        c = short[0]
        raise PartitionError(
            f"class {c} is asked for {needed[c]} samples but only {present[c]} exist; "
            "ask for fewer samples per client"
        )
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    taken = np.zeros(num_classes, dtype=np.int64)
    parts = []
    for row in counts:
        chunks = [pools[c][taken[c] : taken[c] + row[c]] for c in range(num_classes)]
        taken += row
        parts.append(np.sort(np.concatenate(chunks)))
    return parts


def iid(
    labels: np.ndarray, num_clients: int, samples_per_client: int | None, rng: np.random.Generator
) -> list[np.ndarray]:
    """A uniform random split: every client's labels follow the data set's distribution."""
    n = _shard_size(labels, num_clients, samples_per_client)
    chosen = rng.permutation(len(labels))[: num_clients * n].reshape(num_clients, n)
    return [np.sort(row) for row in chosen]


def class_skew(
    labels: np.ndarray,
    num_clients: int,
    samples_per_client: int | None,
    rng: np.random.Generator,
    p_major: float = 0.8,
    major_classes: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """ProxyFL's class non-IID split (Kalra et al., Nat. Commun. 2023, arXiv:2111.11343).

    Client ``k``'s major class is ``major_classes[k]``, by default ``k mod C`` so that clients
    have distinct major classes whenever there are no more clients than classes. Its
    ``round(p_major * n)`` major samples are joined by the rest, split equally over the other
    ``C - 1`` classes (a remainder goes to randomly chosen ones).
    """
    if samples_per_client is None:
        raise PartitionError("class_skew needs samples_per_client (the paper uses 1000)")
    n = _shard_size(labels, num_clients, samples_per_client)
    if not 0.0 <= p_major <= 1.0:
        raise PartitionError(f"p_major must lie in [0, 1], got {p_major}")
    num_classes = int(labels.max()) + 1
    if num_classes < 2:
        raise PartitionError(f"class_skew needs at least 2 classes, labels have {num_classes}")
    if major_classes is None:
        major_classes = [k % num_classes for k in range(num_clients)]
    if len(major_classes) != num_clients or not all(0 <= c < num_classes for c in major_classes):
        raise PartitionError(
            f"major_classes must name one class in 0..{num_classes - 1} per client "
            f"({num_clients}), got {list(major_classes)}"
        )
    counts = np.empty((num_clients, num_classes), dtype=np.int64)
    for k, major in enumerate(major_classes):
        weights = np.full(num_classes, (1.0 - p_major) / (num_classes - 1))
        weights[major] = p_major
        counts[k] = apportion(n, weights, rng)
    return _draw(labels, counts, rng)


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    samples_per_client: int | None,
    rng: np.random.Generator,
    alpha: float = 0.5,
) -> list[np.ndarray]:
    """Dirichlet label skew (Hsu, Qi & Brown, arXiv:1909.06335, 2019).

    Client ``k`` draws ``q_k ~ Dir(alpha * p)``, ``p`` the class distribution of ``labels``;
    ``alpha -> 0`` gives one class per client and ``alpha -> inf`` the distribution ``p``.
    Clients are filled in order; when a class runs out, a client's share of it goes to its
    other classes in proportion to ``q_k`` (counted and logged), so the whole data set can be
    dealt out.
    """
    n = _shard_size(labels, num_clients, samples_per_client)
    if not alpha > 0:
        raise PartitionError(f"dirichlet alpha must be positive, got {alpha}")
    supply = np.bincount(labels)
    prior = supply / supply.sum()
    counts = np.zeros((num_clients, len(supply)), dtype=np.int64)
    moved = 0
    for k in range(num_clients):
        # Classes absent from the data have prior 0 and would make Dir() undefined.
        q = np.zeros(len(supply))
        q[prior > 0] = rng.dirichlet(alpha * prior[prior > 0])
        wanted = apportion(n, q, rng)
        left = supply - counts.sum(axis=0)
        row = np.minimum(wanted, left)
        while row.sum() < n:
            open_classes = left - row > 0
            weights = np.where(open_classes, q, 0.0)
            if weights.sum() == 0:
                weights = np.where(open_classes, prior, 0.0)
            row += np.minimum(apportion(n - int(row.sum()), weights, rng), left - row)
        moved += int(np.abs(row - wanted).sum()) // 2
        counts[k] = row
    if moved:
        log.info("dirichlet: %d samples went to other classes because their class ran out", moved)
    return _draw(labels, counts, rng)


PARTITIONERS = catalog.PARTITIONERS


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    samples_per_client: int | None,
    rng: np.random.Generator,
    **params: float | Sequence[int],
) -> list[np.ndarray]:
    """Disjoint, sorted index arrays into ``labels``, one per client, made by ``scheme``.

    ``params`` are the scheme's own (``p_major``, ``major_classes`` for ``class_skew``;
    ``alpha`` for ``dirichlet``). ``samples_per_client=None`` deals out the whole data set in
    equal shares (``iid``, ``dirichlet``).
    """
    if scheme not in PARTITIONERS:
        raise PartitionError(
            f"unknown partition scheme {scheme!r}; known: {', '.join(sorted(PARTITIONERS))}"
        )
    return PARTITIONERS[scheme](
        _check_labels(labels), num_clients, samples_per_client, rng, **params
    )


def label_histogram(
    labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int
) -> np.ndarray:
    """Counts per client and class, ``(K, C)`` int64: the partition statistics that get logged."""
    labels = np.asarray(labels)
    if labels.size and labels.max() >= num_classes:
        raise PartitionError(f"label {labels.max()} is outside 0..{num_classes - 1}")
    return np.stack([np.bincount(labels[part], minlength=num_classes) for part in parts])


def client_test_indices(
    test_labels: np.ndarray,
    distributions: np.ndarray,
    samples_per_client: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """A test set per client whose labels follow that client's training label distribution.

    ``distributions`` is ``(K, C)``: class counts or proportions per client, e.g. the
    ``label_histogram`` of the training partition. As in ProxyFL's evaluation (Kalra et al.,
    2023), each client is tested on data distributed like its own. Each client's
    ``samples_per_client`` indices are distinct; different clients draw independently from
    the same test split, so their test sets may overlap.
    """
    test_labels = _check_labels(test_labels)
    distributions = np.asarray(distributions, dtype=np.float64)
    if distributions.ndim != 2 or (distributions < 0).any() or (distributions.sum(1) <= 0).any():
        raise PartitionError(
            f"distributions must be (clients, classes) non-negative rows with a positive sum, "
            f"got shape {distributions.shape}"
        )
    if samples_per_client < 1:
        raise PartitionError(f"samples_per_client must be at least 1, got {samples_per_client}")
    tests = []
    for k, row in enumerate(distributions):
        counts = apportion(samples_per_client, row, rng)[None, :]
        try:
            tests.extend(_draw(test_labels, counts, rng))
        except PartitionError as err:
            raise PartitionError(f"test set of client {k}: {err}") from None
    return tests


def holdout_indices(
    labels: np.ndarray,
    parts: Sequence[np.ndarray],
    samples_per_client: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Per client, ``samples_per_client`` indices into ``labels`` that no shard of ``parts``
    holds, with that client's shard's label distribution: the membership audit's
    non-members (``federation.audit``), drawn from the distribution its members come from.
    They are disjoint from every shard and from each other, so a record that one client's
    audit calls a non-member was trained on by no client.
    """
    labels = _check_labels(labels)
    used = np.zeros(len(labels), dtype=bool)
    for part in parts:
        used[part] = True
    pool = np.flatnonzero(~used)
    num_classes = int(labels.max()) + 1
    histogram = label_histogram(labels, parts, num_classes)
    counts = np.stack([apportion(samples_per_client, row, rng) for row in histogram])
    try:
        drawn = _draw(labels[pool], counts, rng)
    except PartitionError as err:
        raise PartitionError(f"audit.holdout = {samples_per_client}: {err} (images no client "
                             "trains on)") from None
    return [pool[d] for d in drawn]


def draw_canaries(
    labels: np.ndarray,
    taken: Sequence[np.ndarray],
    num_clients: int,
    per_client: int,
    rng: np.random.Generator,
) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per client, ``2 * per_client`` indices into ``labels`` outside every array of
    ``taken`` and disjoint across clients, each with a wrong label drawn uniformly from the
    other classes, split at random into ``member`` and ``nonmember`` halves: canaries
    (Jagielski et al., NeurIPS 2020) for the membership audit (``federation.audit``)."""
    labels = _check_labels(labels)
    num_classes = int(labels.max()) + 1
    used = np.zeros(len(labels), dtype=bool)
    for part in taken:
        used[part] = True
    pool = np.flatnonzero(~used)
    if len(pool) < 2 * per_client * num_clients:
        raise PartitionError(f"audit.canaries = {per_client}: {num_clients} clients need "
                             f"{2 * per_client * num_clients} images that no client trains "
                             f"on, and {len(pool)} are left")
    chosen = rng.permutation(pool)[: 2 * per_client * num_clients].reshape(num_clients, -1)
    canaries = []
    for row in chosen:
        wrong = (labels[row] + rng.integers(1, num_classes, size=len(row))) % num_classes
        canaries.append({"member": (row[:per_client], wrong[:per_client]),
                         "nonmember": (row[per_client:], wrong[per_client:])})
    return canaries

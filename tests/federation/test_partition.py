"""Client partitions: disjoint shards with the label skew each scheme promises."""

from __future__ import annotations

import numpy as np
import pytest

from federation.data.partition import (
    PartitionError,
    apportion,
    client_test_indices,
    label_histogram,
    partition,
)

C = 10


def balanced_labels(per_class: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(C), per_class))


# An MNIST-sized class balance is not needed: 2k per class covers the paper's 8 x 1k setting.
LABELS = balanced_labels(2000)
SCHEMES = [("iid", {}), ("class_skew", {"p_major": 0.8}), ("dirichlet", {"alpha": 0.5})]


@pytest.mark.parametrize(("scheme", "params"), SCHEMES)
def test_shards_are_disjoint_and_sized(scheme, params):
    parts = partition(LABELS, 8, scheme, 1000, np.random.default_rng(0), **params)
    assert len(parts) == 8
    assert all(len(p) == 1000 and p.dtype == np.int64 for p in parts)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)
    assert joined.min() >= 0 and joined.max() < len(LABELS)


@pytest.mark.parametrize(("scheme", "params"), SCHEMES)
def test_same_seed_same_partition_other_seed_another(scheme, params):
    def make(seed):
        return partition(LABELS, 8, scheme, 500, np.random.default_rng(seed), **params)

    first, again, other = make(7), make(7), make(8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("p_major", [0.8, 0.5, 1.0])
def test_class_skew_major_fraction_and_uniform_rest(p_major):
    parts = partition(LABELS, 8, "class_skew", 1000, np.random.default_rng(1), p_major=p_major)
    hist = label_histogram(LABELS, parts, C)
    for k, row in enumerate(hist):
        major = k % C  # distinct major classes, assigned in client order
        assert row[major] / 1000 == pytest.approx(p_major, abs=0.001)
        rest = np.delete(row, major)
        assert rest.max() - rest.min() <= 1
        assert rest.sum() == 1000 - row[major]


def test_class_skew_wraps_major_classes_with_more_clients_than_classes():
    parts = partition(LABELS, 12, "class_skew", 500, np.random.default_rng(2), p_major=0.8)
    majors = label_histogram(LABELS, parts, C).argmax(axis=1)
    np.testing.assert_array_equal(majors, np.arange(12) % C)


def test_class_skew_explicit_major_classes():
    parts = partition(
        LABELS, 3, "class_skew", 200, np.random.default_rng(3), major_classes=[9, 9, 4]
    )
    np.testing.assert_array_equal(label_histogram(LABELS, parts, C).argmax(axis=1), [9, 9, 4])


def test_iid_follows_the_overall_distribution():
    labels = np.random.default_rng(4).choice(C, size=20000, p=np.linspace(1, 3, C) / 20)
    parts = partition(labels, 8, "iid", 1000, np.random.default_rng(5))
    fractions = label_histogram(labels, parts, C) / 1000
    overall = np.bincount(labels, minlength=C) / len(labels)
    # 5 standard errors of a class fraction at n = 1000.
    assert np.abs(fractions - overall).max() < 5 * np.sqrt(0.25 / 1000)


def test_dirichlet_concentration_controls_skew():
    def max_share(alpha):
        parts = partition(LABELS, 8, "dirichlet", 1000, np.random.default_rng(6), alpha=alpha)
        return label_histogram(LABELS, parts, C).max(axis=1) / 1000

    assert max_share(0.01).mean() > 0.9  # nearly one class per client
    near_uniform = max_share(1000.0)
    assert near_uniform.max() < 0.1 + 5 * np.sqrt(0.09 / 1000)


def test_dirichlet_deals_out_everything_when_classes_run_out():
    parts = partition(LABELS, 8, "dirichlet", None, np.random.default_rng(7), alpha=0.05)
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS) == len(np.unique(joined))


def test_iid_without_size_uses_equal_shares():
    parts = partition(LABELS[:1003], 4, "iid", None, np.random.default_rng(8))
    assert [len(p) for p in parts] == [250] * 4


@pytest.mark.parametrize("n_test", [1000, 317])
def test_client_test_sets_follow_the_client_distribution(n_test):
    rng = np.random.default_rng(9)
    train_parts = partition(LABELS, 8, "dirichlet", 1000, rng, alpha=0.3)
    train_hist = label_histogram(LABELS, train_parts, C)
    test_labels = balanced_labels(1000, seed=1)

    tests = client_test_indices(test_labels, train_hist, n_test, rng)

    test_hist = label_histogram(test_labels, tests, C)
    assert (test_hist.sum(axis=1) == n_test).all()
    # Largest-remainder counts are within one sample of the exact share.
    assert np.abs(test_hist - n_test * train_hist / 1000).max() < 1
    assert all(len(np.unique(t)) == n_test for t in tests)


def test_apportion_is_exact_within_one():
    rng = np.random.default_rng(10)
    for _ in range(50):
        weights = rng.dirichlet(np.ones(7)) * rng.integers(0, 2, size=7)
        if weights.sum() == 0:
            continue
        total = int(rng.integers(0, 5000))
        counts = apportion(total, weights, rng)
        assert counts.sum() == total
        assert np.abs(counts - total * weights / weights.sum()).max() < 1
        assert (counts[weights == 0] == 0).all()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda rng: partition(LABELS, 8, "iid", 3000, rng), "24000 > 20000"),
        (
            lambda rng: partition(LABELS, 3, "class_skew", 3000, rng, major_classes=[1, 1, 2]),
            "class 1 is asked for",
        ),
        (lambda rng: partition(LABELS, 2, "class_skew", None, rng), "samples_per_client"),
        (lambda rng: partition(LABELS, 2, "class_skew", 10, rng, p_major=1.5), "p_major"),
        (
            lambda rng: partition(LABELS, 2, "class_skew", 10, rng, major_classes=[0]),
            "major_classes",
        ),
        (lambda rng: partition(LABELS, 2, "dirichlet", 10, rng, alpha=0.0), "alpha"),
        (lambda rng: partition(LABELS, 0, "iid", 10, rng), "num_clients"),
        (lambda rng: partition(LABELS, 2, "shards", 10, rng), "unknown partition scheme"),
        (lambda rng: partition(LABELS.astype(float), 2, "iid", 10, rng), "integer"),
        (
            lambda rng: client_test_indices(balanced_labels(10), np.eye(C)[:2], 11, rng),
            "test set of client 0: class 0",
        ),
    ],
)
def test_impossible_requests_raise_one_line(call, message):
    with pytest.raises(PartitionError, match=message) as err:
        call(np.random.default_rng(11))
    assert "\n" not in str(err.value)

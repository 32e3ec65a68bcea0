"""The engine's reader of patch bags (HDF5, format versions 1 and 2), with h5py alone.

The bag format is owned by ``wsi/bag.py`` (docs/bag-format.md); the engine never
imports ``wsi/`` (it must not depend on the slide library), so this module reads the
documented layout itself:

- ``coords`` int64 ``(N, 2)``; ``patches`` in the encoding its ``encoding`` attribute names
  (``jpeg``: variable-length uint8, one JPEG file per patch; ``deflate``: uint8
  ``(N, P, P, 3)``); root attributes ``format``, ``format_version``, ``slide_id``,
  ``target_mpp``, ``patches.attrs["patch_size"]``.
- version 2 adds ``labels`` float32 ``(N,)``, the tumour-area fraction of each patch, with
  attributes ``source`` (``annotation``, or ``slide`` for weak labels copied from the slide
  label) and ``threshold`` (a patch is tumour when its fraction is at least this), and
  per-patch ``checksums`` (CRC-32 of each stored patch's bytes: the JPEG file, or the
  deflate chunk's zlib stream), which this reader verifies before decoding.

A bag is read lazily: ``BagIndex`` holds a slide's metadata and patch labels (a few bytes
per patch), and ``BagReader`` decodes the patches asked for, keeping a bounded number of
files open per process, so neither a bag nor a cohort is ever in memory. Every problem is a
``BagFormatError`` naming the file.
"""

from __future__ import annotations

import logging
import os
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import h5py
import imagecodecs
import numpy as np
import torch

from formats.errors import one_line

log = logging.getLogger(__name__)

FORMAT_NAME = "slidefed-bag"
READABLE_VERSIONS = (1, 2)
ENCODINGS = ("jpeg", "deflate")


class BagFormatError(ValueError):
    """A bag the engine cannot train on; ``str()`` is ``<path>: <reason>``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class BagIndex:
    """What the engine keeps in memory about one slide's bag.

    ``patch_labels`` is int64 ``(N,)``: 1 for a tumour patch. ``label_source`` says where
    they come from: ``annotation`` (tumour-area fraction ≥ the bag's threshold), ``slide``
    (the slide label for every patch, weak supervision, also for bags of format version 1).
    ``label`` is None for a slide of unknown diagnosis (``slidefed predict``); its weak patch
    labels are then -1.
    """

    path: Path
    slide_id: str
    label: int | None
    n_patches: int
    patch_size: int
    target_mpp: float
    patch_labels: np.ndarray
    label_source: str


def index_bag(path: str | Path, label: int | None) -> BagIndex:
    """Open ``path``, check it against the format, and index it for training.

    ``label`` is the slide's 0/1 label from the manifest; it becomes every patch's label when
    the bag has no annotation-derived labels; None when the diagnosis is what is sought.
    """
    path = Path(path)
    if not path.is_file():
        raise BagFormatError(path, "bag not found")
    try:
        with h5py.File(path, "r") as f:
            return _index_open_bag(path, f, label)
    except OSError as error:
        raise BagFormatError(path, f"unreadable bag ({error})") from None


def _index_open_bag(path: Path, f: h5py.File, label: int | None) -> BagIndex:
    attrs = f.attrs
    if attrs.get("format") != FORMAT_NAME:
        raise BagFormatError(path, f"not a slidefed bag (format {attrs.get('format')!r})")
    version = int(attrs.get("format_version", -1))
    if version not in READABLE_VERSIONS:
        raise BagFormatError(path, f"bag format version {version} is not one of "
                                   f"{list(READABLE_VERSIONS)}; re-run preprocessing")
    for name in ("slide_id", "target_mpp"):
        if name not in attrs:
            raise BagFormatError(path, f"missing root attribute {name!r}")
    for name in ("coords", "patches"):
        if name not in f:
            raise BagFormatError(path, f"missing dataset {name!r}")
    patches = f["patches"]
    encoding = patches.attrs.get("encoding")
    if encoding not in ENCODINGS:
        raise BagFormatError(path, f"patch encoding {encoding!r} is not one of {list(ENCODINGS)}")
    if "patch_size" not in patches.attrs:
        raise BagFormatError(path, "patches lack attribute 'patch_size'")
    n = int(f["coords"].shape[0])
    if n == 0 or patches.shape[0] != n:
        raise BagFormatError(path, "bag holds no patches" if n == 0 else
                             f"{patches.shape[0]} patches for {n} coordinates")
    patch_labels = np.full(n, -1 if label is None else label, np.int64)
    source = "slide"
    if "labels" in f:
        labels = f["labels"]
        if labels.shape != (n,):
            raise BagFormatError(path, f"labels has shape {labels.shape}, expected ({n},)")
        source = str(labels.attrs.get("source", ""))
        if source == "annotation":
            if "threshold" not in labels.attrs:
                raise BagFormatError(path, "annotation labels lack attribute 'threshold'")
            patch_labels = (labels[()] >= float(labels.attrs["threshold"])).astype(np.int64)
        elif source != "slide":
            raise BagFormatError(path, f"labels source {source!r} is not annotation or slide")
    if source == "annotation" and label == 0 and patch_labels.any():
        raise BagFormatError(path, "slide label is 0 but its annotations mark tumour patches")
    return BagIndex(path=path, slide_id=str(attrs["slide_id"]), label=label, n_patches=n,
                    patch_size=int(patches.attrs["patch_size"]),
                    target_mpp=float(attrs["target_mpp"]), patch_labels=patch_labels,
                    label_source=source)


@dataclass(frozen=True)
class _OpenBag:
    """An open bag and what every read needs of it, looked up once per open: h5py's object
    and attribute lookups cost more than reading a step's patches of a slide."""

    handle: h5py.File
    patches: h5py.Dataset
    encoding: str
    patch_size: int
    checksums: np.ndarray | None  # uint32 (N,), version 2


class BagReader:
    """Decodes patches of bags, keeping at most ``max_open`` files open in this process.

    ``threads`` is how many batches scoring reads and decodes at once, ahead of the model
    (``federation.evaluation.scoring.model_batches``; HDF5 serialises its reads, the JPEG
    decodes run in parallel). Safe to hand to DataLoader worker processes: a process never
    uses handles it inherited (HDF5 handles do not survive ``fork``), it opens its own on
    first use.
    """

    def __init__(self, max_open: int = 16, threads: int = 1) -> None:
        if max_open < 1:
            raise ValueError(f"BagReader: max_open must be at least 1, got {max_open}")
        if threads < 1:
            raise ValueError(f"BagReader: threads must be at least 1, got {threads}")
        self.max_open = max_open
        self.threads = threads
        self._files: OrderedDict[Path, _OpenBag] = OrderedDict()
        self._pid = os.getpid()
        self._opening = threading.Lock()  # scoring's reader threads share the open files

    def __getstate__(self) -> dict:
        return {"max_open": self.max_open, "threads": self.threads}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_open"], state["threads"])

    def _file(self, path: Path) -> _OpenBag:
        with self._opening:
            return self._open_file(path)

    def _open_file(self, path: Path) -> _OpenBag:
        if self._pid != os.getpid():  # forked: the parent's handles are not ours to use
            self._files, self._pid = OrderedDict(), os.getpid()
        bag = self._files.get(path)
        if bag is not None:
            self._files.move_to_end(path)
            return bag
        while len(self._files) >= self.max_open:
            _, oldest = self._files.popitem(last=False)
            oldest.handle.close()
        try:
            handle = h5py.File(path, "r")
        except OSError as error:
            raise BagFormatError(path, f"unreadable bag ({error})") from None
        patches = handle["patches"]
        try:
            checksums = handle["checksums"][()] if "checksums" in handle else None
        except OSError as error:  # HDF5's Fletcher-32 check of the checksums themselves
            handle.close()
            raise BagFormatError(path, f"checksums are damaged ({one_line(error)})") from None
        bag = _OpenBag(handle, patches, str(patches.attrs["encoding"]),
                       int(patches.attrs["patch_size"]), checksums)
        self._files[path] = bag
        return bag

    @property
    def open_files(self) -> int:
        """Files this process holds open now."""
        return len(self._files) if self._pid == os.getpid() else 0

    def read(self, path: Path, indices: np.ndarray) -> torch.Tensor:
        """Patches ``indices`` of the bag at ``path`` as uint8 ``(k, 3, P, P)``, in the order
        given; checksums (format version 2) are verified."""
        bag = self._file(path)
        unique, inverse = np.unique(np.asarray(indices, np.int64), return_inverse=True)
        if not len(unique):
            return torch.empty((0, 3, bag.patch_size, bag.patch_size), dtype=torch.uint8)
        stored = self._stored(bag.patches, bag.encoding, unique)
        if bag.checksums is not None:
            for index, data in zip(unique.tolist(), stored, strict=True):
                if zlib.crc32(data) != int(bag.checksums[index]):
                    raise BagFormatError(path, f"patch {index} is corrupt (checksum mismatch)")
        decoded = (self._inflate(path, stored, unique, bag.patch_size)
                   if bag.encoding == "deflate"
                   else self._decode_jpegs(path, stored, unique, bag.patch_size))
        if len(unique) == len(inverse) and np.array_equal(unique, indices):
            return decoded  # already in order, as scoring's batches are: no reordering copy
        return decoded[torch.from_numpy(inverse.reshape(-1))]

    @staticmethod
    def _stored(patches: h5py.Dataset, encoding: str, unique: np.ndarray) -> list:
        """Patches ``unique`` (sorted) as stored, the bytes their checksums cover: JPEG files,
        fetched in one HDF5 selection (a read per patch costs ~8x more), or each chunk's zlib
        stream (deflate: one chunk per patch)."""
        if encoding == "deflate":
            return [patches.id.read_direct_chunk((i, 0, 0, 0))[1] for i in unique.tolist()]
        return list(patches[unique])

    @staticmethod
    def _inflate(path: Path, stored: list, unique: np.ndarray, size: int) -> torch.Tensor:
        pixels = np.empty((len(stored), size * size * 3), np.uint8)
        for row, (index, data) in enumerate(zip(unique.tolist(), stored, strict=True)):
            try:
                pixels[row] = np.frombuffer(zlib.decompress(data), np.uint8)
            except (zlib.error, ValueError) as error:
                raise BagFormatError(path, f"patch {index} does not decode ({error})") from None
        return torch.from_numpy(pixels.reshape(-1, size, size, 3)).permute(0, 3, 1, 2)

    @staticmethod
    def _decode_jpegs(path: Path, stored: list, unique: np.ndarray, size: int) -> torch.Tensor:
        # libjpeg-turbo through imagecodecs: the pixels Pillow and torchvision decode, at
        # torchvision's batched speed, and not deprecated (torchvision 0.29's decoders are).
        # Each patch decodes straight into its row (no array per patch, no copy).
        pixels = np.empty((len(stored), size, size, 3), np.uint8)
        for row, (index, data) in enumerate(zip(unique.tolist(), stored, strict=True)):
            try:
                imagecodecs.jpeg8_decode(data, out=pixels[row])
            except imagecodecs.Jpeg8Error as error:
                raise BagFormatError(path, f"patch {index} does not decode "
                                           f"({one_line(error)})") from None
            except ValueError as error:  # imagecodecs: the image is not the out's shape
                raise BagFormatError(path, f"patch {index} is not {size}x{size} RGB "
                                           f"({one_line(error)})") from None
        return torch.from_numpy(pixels).permute(0, 3, 1, 2)

    def close(self) -> None:
        """Close every file this process opened."""
        if self._pid == os.getpid():
            for bag in self._files.values():
                bag.handle.close()
        self._files = OrderedDict()

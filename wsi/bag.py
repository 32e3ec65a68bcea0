"""The patch bag: one HDF5 file per slide, readable with h5py alone (format version 2).

Layout (DESIGN.md). ``N`` is the number of patches, ``P`` the patch side at the target
resolution. Every small dataset is chunked with HDF5's standard Fletcher-32 filter, so h5py
itself refuses (``OSError``) to return a damaged chunk of it.

- ``coords`` int64 (N, 2): level-0 (x, y) of each patch's top-left corner. Attributes
  ``patch_level`` and ``patch_size`` follow CLAM (Lu et al., Nat. Biomed. Eng. 2021): the
  pyramid level read and the patch side *at that level*, so CLAM-style tools re-read the same
  regions; ``patch_size_level0`` (TRIDENT's name) is the side in level-0 pixels, so patch i
  covers ``[x, x + patch_size_level0) x [y, y + patch_size_level0)`` of level 0.
- ``patches``: RGB pixels at the target resolution, one patch per read, in the encoding named
  by its ``encoding`` attribute (with ``encoding_level``, ``patch_size`` = P, ``color="RGB"``):
  ``jpeg`` (default): variable-length uint8 (N,), each element one baseline JPEG file
  (4:4:4 chroma), decoded by any JPEG library; its *stored bytes* are ``bytes(ds[i])``.
  ``deflate``: uint8 (N, P, P, 3), one HDF5 chunk per patch with HDF5's standard deflate
  filter (lossless, decoded by h5py itself); its *stored bytes* are the compressed chunk,
  ``ds.id.read_direct_chunk((i, 0, 0, 0))[1]`` (a zlib stream of the P*P*3 pixels).
  README.md has the measurements behind the default.
- ``checksums`` uint32 (N,), attribute ``algorithm="crc32"``: ``zlib.crc32`` of patch i's
  stored bytes, computed by the worker that encoded it. A reader compares before decoding,
  because libjpeg decodes damaged data without complaint.
- ``tissue_fraction`` float32 (N,), in [0, 1].
- ``labels`` float32 (N,), in [0, 1], optional (absent when the slide had neither an
  annotation nor a label). Attribute ``source``: ``annotation`` (the tumour-area fraction of
  the patch's level-0 footprint, from the slide's tumour polygons) or ``slide`` (weak labels:
  the slide label, 0 or 1, copied to every patch). Attribute ``threshold``: a patch is tumour
  when ``labels >= threshold``.
- Root attributes, :data:`ROOT_ATTRIBUTES`: ``format="slidefed-bag"``, ``format_version=2``,
  ``slide_id``, ``source_path`` (the slide file's absolute path, symlinks not resolved, as the
  manifest's ``path``), ``mpp_level0``, ``mpp_source`` (``file``: the slide stated
  its µm/px; ``fill``: it stated none and ``--fill-mpp`` gave it; ``override``:
  ``--override-mpp`` replaced what it stated; ``user``, read but no longer written: the
  retired ``--slide-mpp``), ``target_mpp``, ``read_level``,
  ``level0_width``, ``level0_height``, ``vendor``, ``slidefed_version``.

Version 1 bags (still read) lack ``checksums``, ``labels`` and ``mpp_source``, and have no
Fletcher-32 filter. Any other ``format_version`` is refused.

A bag is written under a hidden temporary name and renamed into place when complete: it
either exists whole or not at all. Readers: :func:`bag_version`, :func:`read_patches`
(verifies checksums), :func:`read_labels`, :func:`check_bag`.
"""

from __future__ import annotations

import io
import os
import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from formats.atomic import partial_path
from formats.errors import one_line

# PIL loads its JPEG and PNG plugins on the first encode; do it at import, so the processes a
# preprocessing job forks for its slides inherit them.
Image.preinit()

FORMAT_NAME = "slidefed-bag"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CHECKSUM_ALGORITHM = "crc32"
LABEL_SOURCES = ("annotation", "slide")
MPP_SOURCES = ("file", "fill", "override")
# Written by the first version-2 writers for the retired --slide-mpp (which overrode).
_LEGACY_MPP_SOURCES = ("user",)


class BagError(ValueError):
    """A bag is missing, incomplete or not in the format. ``str()`` is ``<path>: <reason>``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class BagAttributes:
    """Root attributes of a bag: where its patches came from and at what resolution."""

    slide_id: str
    source_path: str
    mpp_level0: float
    mpp_source: str  # one of MPP_SOURCES
    target_mpp: float
    read_level: int
    level0_width: int
    level0_height: int
    vendor: str

    def __post_init__(self) -> None:
        if self.mpp_source not in MPP_SOURCES:
            raise ValueError(f"mpp source must be one of {MPP_SOURCES}, got {self.mpp_source!r}")


ROOT_ATTRIBUTES = (*BagAttributes.__dataclass_fields__, "format", "format_version",
                   "slidefed_version")
# What each readable version requires; version 2 added mpp_source.
_ROOT_ATTRIBUTES_BY_VERSION = {1: tuple(a for a in ROOT_ATTRIBUTES if a != "mpp_source"),
                               2: ROOT_ATTRIBUTES}


@dataclass(frozen=True)
class PatchGeometry:
    """Patch sizes: ``patch_size`` at the target resolution, ``read_size`` at the read level."""

    patch_size: int
    read_size: int
    step_level0: int


@dataclass(frozen=True)
class PatchLabels:
    """Per-patch labels in [0, 1] and where they came from (``annotation`` or ``slide``)."""

    values: np.ndarray
    source: str
    threshold: float

    def __post_init__(self) -> None:
        if self.source not in LABEL_SOURCES:
            raise ValueError(f"label source must be one of {LABEL_SOURCES}, got {self.source!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"label threshold must be in [0, 1], got {self.threshold}")
        values = np.asarray(self.values, np.float32)
        if values.ndim != 1 or not ((values >= 0) & (values <= 1)).all():
            raise ValueError("labels must be a 1-D array of values in [0, 1]")
        if self.source == "slide" and not np.isin(values, (0.0, 1.0)).all():
            raise ValueError("slide labels must be 0 or 1")
        object.__setattr__(self, "values", values)

    @property
    def tumour(self) -> np.ndarray:
        """Boolean (N,): which patches count as tumour."""
        return self.values >= self.threshold


def checksum(data: bytes) -> int:
    """The integrity checksum of one patch's stored bytes (CRC-32, as ``zlib.crc32``)."""
    return zlib.crc32(data)


class _Codec(ABC):
    """How one encoding lays out, writes, fetches and decodes the ``patches`` dataset."""

    levels: range
    default_level: int

    @abstractmethod
    def create(self, f: h5py.File, n: int, size: int, level: int) -> h5py.Dataset: ...

    @abstractmethod
    def encode(self, patch: np.ndarray, level: int) -> bytes: ...

    @abstractmethod
    def write(self, ds: h5py.Dataset, start: int, encoded: Sequence[bytes]) -> None: ...

    @abstractmethod
    def stored(self, ds: h5py.Dataset, i: int) -> bytes:
        """Patch ``i`` as the bytes :meth:`write` stored (what the checksum covers)."""

    @abstractmethod
    def decode(self, data: bytes, size: int) -> np.ndarray:
        """Stored bytes to a (size, size, 3) uint8 array (any other shape is corruption)."""

    @abstractmethod
    def layout_problem(self, ds: h5py.Dataset, n: int, size: int) -> str | None: ...


class _Jpeg(_Codec):
    """Baseline JPEG files (libjpeg-turbo through Pillow), one variable-length element each.

    Chroma is not subsampled (4:4:4): in H&E the colour is the stain, and 4:2:0 subsampling
    more than triples the pixel error at the same quality (README.md, encodings).
    """

    levels = range(1, 96)
    default_level = 90

    def create(self, f, n, size, level):
        return f.create_dataset("patches", shape=(n,), dtype=h5py.vlen_dtype(np.uint8),
                                chunks=(min(max(n, 1), 64),) if n else None)

    def encode(self, patch, level):
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(patch, dtype=np.uint8)).save(
            buffer, format="JPEG", quality=level, subsampling="4:4:4")
        return buffer.getvalue()

    def write(self, ds, start, encoded):
        # h5py's ds[a:b] = ... turns a batch of one, or of equal lengths, into a 2-D array and
        # refuses it; the low-level write takes the vlen array as it is, 5x faster than
        # writing element by element.
        values = np.empty(len(encoded), dtype=ds.dtype)
        for i, data in enumerate(encoded):
            values[i] = np.frombuffer(data, np.uint8)
        file_space = ds.id.get_space()
        file_space.select_hyperslab((start,), (len(encoded),))
        ds.id.write(h5py.h5s.create_simple((len(encoded),)), file_space, values)

    def stored(self, ds, i):
        return ds[i].tobytes()

    def decode(self, data, size):
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def layout_problem(self, ds, n, size):
        if ds.shape != (n,) or ds.dtype.kind != "O":
            return f"jpeg patches must be variable-length (N,) with N={n}, found {ds.shape}"
        return None


class _Deflate(_Codec):
    """Lossless pixels, one HDF5 chunk per patch, HDF5's deflate filter (a zlib stream)."""

    levels = range(0, 10)
    default_level = 1

    def create(self, f, n, size, level):
        return f.create_dataset("patches", shape=(n, size, size, 3), dtype=np.uint8,
                                chunks=(1, size, size, 3) if n else None,
                                compression="gzip" if n else None,
                                compression_opts=level if n else None)

    def encode(self, patch, level):
        return zlib.compress(np.ascontiguousarray(patch, dtype=np.uint8).tobytes(), level)

    def write(self, ds, start, encoded):
        for i, chunk in enumerate(encoded, start):
            ds.id.write_direct_chunk((i, 0, 0, 0), chunk)

    def stored(self, ds, i):
        # The chunk as written: checking it before inflating catches flips that deflate's own
        # Adler-32 would also catch, and those in the chunk index that it would not.
        return ds.id.read_direct_chunk((i, 0, 0, 0))[1]

    def decode(self, data, size):
        # HDF5's deflate filter is zlib; inflating here saves reading the chunk twice.
        return np.frombuffer(zlib.decompress(data), np.uint8).reshape(size, size, 3)

    def layout_problem(self, ds, n, size):
        if ds.dtype != np.uint8 or ds.shape != (n, size, size, 3):
            return f"deflate patches must be uint8 ({n}, {size}, {size}, 3), found {ds.shape}"
        if n and ds.chunks != (1, size, size, 3):
            return f"patches must be chunked one patch per chunk, found {ds.chunks}"
        if n and ds.compression != "gzip":
            return f"deflate patches must use HDF5's gzip filter, found {ds.compression}"
        return None


CODECS: dict[str, _Codec] = {"jpeg": _Jpeg(), "deflate": _Deflate()}


@dataclass(frozen=True)
class PatchEncoding:
    """How patches are stored: ``jpeg`` (level = quality 1-95) or ``deflate`` (level 0-9)."""

    name: str = "jpeg"
    level: int | None = None  # None: the encoding's default

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"unknown patch encoding {self.name!r}; choose from "
                             f"{', '.join(CODECS)}")
        codec = CODECS[self.name]
        if self.level is None:
            object.__setattr__(self, "level", codec.default_level)
        elif self.level not in codec.levels:
            raise ValueError(f"{self.name} level must be {codec.levels.start}-"
                             f"{codec.levels.stop - 1}, got {self.level}")

    def encode(self, patch: np.ndarray) -> bytes:
        """One (P, P, 3) uint8 patch as stored bytes."""
        return CODECS[self.name].encode(patch, self.level)


def _small_dataset(f: h5py.File, name: str, data: np.ndarray) -> h5py.Dataset:
    # Fletcher-32 needs a chunked layout; h5py chooses the chunks.
    return f.create_dataset(name, data=data, fletcher32=True)


def _read(ds: h5py.Dataset, selection: int | tuple = ()) -> np.ndarray:
    """``ds[selection]``, with HDF5's read errors (a failed Fletcher-32 check among them) as a
    :class:`BagError` naming the dataset."""
    try:
        return ds[selection]
    except OSError as exc:
        raise BagError(ds.file.filename,
                       f"{ds.name.lstrip('/')} is damaged ({one_line(exc)})") from None


def bag_version(f: h5py.File) -> int:
    """The format version of the open bag ``f``; :class:`BagError` if it is not one we read."""
    if f.attrs.get("format") != FORMAT_NAME:
        raise BagError(f.filename, f"format is {f.attrs.get('format')!r}, expected "
                                   f"{FORMAT_NAME!r}")
    found = f.attrs.get("format_version")
    if found is None or int(found) not in READABLE_VERSIONS:
        raise BagError(f.filename, f"format version {found} is not one this slidefed reads "
                                   f"({', '.join(map(str, READABLE_VERSIONS))})")
    return int(found)


def read_patches(f: h5py.File, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """Decode patches ``indices`` of an open bag to uint8 (k, P, P, 3), whatever the encoding.

    In a version-2 bag each patch's stored bytes are checked against ``checksums`` first;
    a mismatch, or a patch that does not decode to P x P RGB, raises :class:`BagError`
    naming the bag and the patch.
    """
    ds = f["patches"]
    codec = CODECS[ds.attrs["encoding"]]
    size = int(ds.attrs["patch_size"])
    sums = f["checksums"] if bag_version(f) >= 2 else None
    out = np.empty((len(indices), size, size, 3), np.uint8)
    for k, i in enumerate(np.asarray(indices, np.int64).tolist()):
        try:
            data = codec.stored(ds, i)
        except OSError as exc:
            raise BagError(f.filename, f"patch {i} is unreadable ({one_line(exc)})") from None
        if sums is not None and checksum(data) != int(_read(sums, i)):
            raise BagError(f.filename, f"patch {i} is corrupt (checksum mismatch)")
        try:
            patch = codec.decode(data, size)
        except (OSError, ValueError, zlib.error) as exc:  # PIL raises OSError subclasses
            raise BagError(f.filename, f"patch {i} does not decode ({one_line(exc)})") from None
        if patch.shape != (size, size, 3):
            raise BagError(f.filename, f"patch {i} does not decode to {size}x{size} RGB")
        out[k] = patch
    return out


def read_labels(f: h5py.File) -> PatchLabels | None:
    """The ``labels`` of an open bag, checked, or None when it has none."""
    if "labels" not in f:
        return None
    ds = f["labels"]
    n = f["coords"].shape[0]
    if ds.dtype != np.float32 or ds.shape != (n,):
        raise BagError(f.filename, f"labels must be float32 ({n},), found {ds.dtype} {ds.shape}")
    values = _read(ds)
    try:
        return PatchLabels(values, str(ds.attrs.get("source")),
                           float(ds.attrs.get("threshold", np.nan)))
    except ValueError as exc:
        raise BagError(f.filename, str(exc)) from None


class BagWriter:
    """Writes one bag: create with all coordinates (and labels) known, add encoded patches
    with their checksums, then commit.

    Patches arrive as pre-encoded chunks so that compression, and the checksum of what it
    produced, run in worker processes; the writer only copies bytes into the file. Used as a
    context manager it commits on success and deletes the temporary file on any exception,
    Ctrl-C included.
    """

    def __init__(self, path: str | Path, attributes: BagAttributes, geometry: PatchGeometry,
                 coords: np.ndarray, tissue_fraction: np.ndarray,
                 encoding: PatchEncoding | None = None,
                 labels: PatchLabels | None = None) -> None:
        self.path = Path(path)
        n = len(coords)
        if labels is not None and labels.values.shape != (n,):
            raise ValueError(f"{n} patches but {labels.values.shape[0]} labels")
        if self.path.is_dir():
            raise BagError(self.path, "is a directory, not a bag file")
        self._tmp = partial_path(self.path)
        self._written = np.zeros(n, bool)
        self._checksums = np.zeros(n, np.uint32)
        self._file = h5py.File(self._tmp, "w")
        try:
            self._patches = self._create(attributes, geometry, coords, tissue_fraction,
                                         encoding or PatchEncoding(), labels)
        except BaseException:
            self.abort()
            raise

    def _create(self, attributes: BagAttributes, geometry: PatchGeometry, coords: np.ndarray,
                tissue_fraction: np.ndarray, encoding: PatchEncoding,
                labels: PatchLabels | None) -> h5py.Dataset:
        f, n, size = self._file, len(coords), geometry.patch_size
        f.attrs.update({**asdict(attributes), "format": FORMAT_NAME,
                        "format_version": FORMAT_VERSION,
                        "slidefed_version": version("slidefed")})
        ds = _small_dataset(f, "coords", np.asarray(coords, np.int64).reshape(n, 2))
        ds.attrs.update({"patch_level": attributes.read_level, "patch_size": geometry.read_size,
                         "patch_size_level0": geometry.step_level0})
        _small_dataset(f, "tissue_fraction", np.asarray(tissue_fraction, np.float32))
        if labels is not None:
            ds = _small_dataset(f, "labels", labels.values)
            ds.attrs.update({"source": labels.source, "threshold": labels.threshold})
        self._codec = CODECS[encoding.name]
        patches = self._codec.create(f, n, size, encoding.level)
        patches.attrs.update({"encoding": encoding.name, "encoding_level": encoding.level,
                              "patch_size": size, "color": "RGB"})
        return patches

    def write_chunks(self, start: int, chunks: Sequence[bytes],
                     checksums: Sequence[int]) -> None:
        """Store encoded patches ``start .. start + len(chunks) - 1`` and their checksums
        (:func:`checksum` of each chunk, computed where it was encoded)."""
        if len(checksums) != len(chunks):
            raise ValueError(f"{len(chunks)} chunks but {len(checksums)} checksums")
        self._codec.write(self._patches, start, chunks)
        self._checksums[start:start + len(chunks)] = checksums
        self._written[start:start + len(chunks)] = True

    def commit(self) -> Path:
        """Write the checksums, close the file and rename it into place; every patch must
        have been written. On any failure, the rename included, the temporary file is deleted."""
        try:
            missing = np.flatnonzero(~self._written)
            if len(missing):
                raise BagError(self.path, f"{len(missing)} patches were never written")
            ds = _small_dataset(self._file, "checksums", self._checksums)
            ds.attrs["algorithm"] = CHECKSUM_ALGORITHM
            self._file.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file."""
        if self._file.id.valid:
            self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> BagWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def check_bag(path: str | Path, deep: bool = False) -> int:
    """Check ``path`` against the bag format (version 1 or 2); return its number of patches.

    Raises :class:`BagError` with the first problem found. The shallow check reads the
    metadata, the small datasets (verifying their Fletcher-32 sums) and the last patch,
    checksum included (a truncated file fails there); ``deep`` checks and decodes every patch.
    """
    path = Path(path)
    if not path.is_file():
        raise BagError(path, "bag not found")
    if not h5py.is_hdf5(path):
        raise BagError(path, "not an HDF5 file")
    try:
        with h5py.File(path, "r") as f:
            return _check_open_bag(path, f, deep)
    except BagError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise BagError(path, f"unreadable bag ({one_line(exc)})") from exc


def _check_open_bag(path: Path, f: h5py.File, deep: bool) -> int:
    def fail(reason: str) -> None:
        raise BagError(path, reason)

    format_version = bag_version(f)
    missing = [a for a in _ROOT_ATTRIBUTES_BY_VERSION[format_version] if a not in f.attrs]
    if missing:
        fail(f"missing root attributes {missing}")
    if format_version >= 2 and f.attrs["mpp_source"] not in MPP_SOURCES + _LEGACY_MPP_SOURCES:
        fail(f"mpp_source {f.attrs['mpp_source']!r} is not one of {list(MPP_SOURCES)}")
    for name in ("coords", "patches", "tissue_fraction"):
        if name not in f:
            fail(f"missing dataset {name!r}")
    coords, patches, tissue = f["coords"], f["patches"], f["tissue_fraction"]
    n = coords.shape[0]
    if coords.dtype != np.int64 or coords.shape != (n, 2):
        fail(f"coords must be int64 (N, 2), found {coords.dtype} {coords.shape}")
    for attr in ("patch_level", "patch_size"):
        if attr not in coords.attrs:
            fail(f"coords lacks attribute {attr!r}")
    codec = CODECS.get(patches.attrs.get("encoding"))
    if codec is None:
        fail(f"patches encoding {patches.attrs.get('encoding')!r} is not one of {list(CODECS)}")
    size = int(patches.attrs.get("patch_size", 0))
    problem = codec.layout_problem(patches, n, size)
    if problem:
        fail(problem)
    if tissue.dtype != np.float32 or tissue.shape != (n,):
        fail(f"tissue_fraction must be float32 ({n},), found {tissue.dtype} {tissue.shape}")
    if format_version >= 2:
        if "checksums" not in f:
            fail("missing dataset 'checksums'")
        sums = f["checksums"]
        if sums.dtype != np.uint32 or sums.shape != (n,):
            fail(f"checksums must be uint32 ({n},), found {sums.dtype} {sums.shape}")
        if sums.attrs.get("algorithm") != CHECKSUM_ALGORITHM:
            fail(f"checksum algorithm {sums.attrs.get('algorithm')!r} is not "
                 f"{CHECKSUM_ALGORITHM!r}")
    read_labels(f)
    if n:
        xy = _read(coords)
        limits = np.array([f.attrs["level0_width"], f.attrs["level0_height"]])
        if (xy < 0).any() or (xy >= limits).any():
            fail("coords fall outside the slide's level-0 dimensions")
        t = _read(tissue)
        if (t < 0).any() or (t > 1).any():
            fail("tissue_fraction outside [0, 1]")
        # Checksums and decoding are the integrity check: a corrupt patch raises here. One
        # patch at a time, so a deep check of any bag needs the memory of one patch.
        for i in range(n) if deep else (n - 1,):
            read_patches(f, [i])
    return n

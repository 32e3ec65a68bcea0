"""The patch bag: one HDF5 file per slide, readable with h5py (format version 1).

Layout (DESIGN.md):

- ``coords`` int64 (N, 2): level-0 (x, y) of each patch's top-left corner. Attributes
  ``patch_level`` and ``patch_size`` follow CLAM (Lu et al., Nat. Biomed. Eng. 2021): the
  pyramid level read and the patch side *at that level*, so CLAM-style tools re-read the same
  regions; ``patch_size_level0`` (TRIDENT's name) is the side in level-0 pixels.
- ``patches``: RGB pixels at the target resolution, one patch per read, in the encoding named
  by its ``encoding`` attribute (with ``encoding_level`` and ``patch_size``):
  ``jpeg`` (default): variable-length uint8 (N,), each element one baseline JPEG file
  (4:4:4 chroma), decoded by any JPEG library;
  ``deflate``: uint8 (N, P, P, 3), one HDF5 chunk per patch with HDF5's standard deflate
  filter (lossless, decoded by h5py itself). README.md has the measurements behind the default.
- ``tissue_fraction`` float32 (N,).
- Root attributes: see :data:`ROOT_ATTRIBUTES`.

A bag is written under a hidden temporary name and renamed into place when complete: it
either exists whole or not at all.
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

from slidefed.atomic import partial_path

FORMAT_NAME = "slidefed-bag"
FORMAT_VERSION = 1


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
    target_mpp: float
    read_level: int
    level0_width: int
    level0_height: int
    vendor: str


ROOT_ATTRIBUTES = (*BagAttributes.__dataclass_fields__, "format", "format_version",
                   "slidefed_version")


@dataclass(frozen=True)
class PatchGeometry:
    """Patch sizes: ``patch_size`` at the target resolution, ``read_size`` at the read level."""

    patch_size: int
    read_size: int
    step_level0: int


class _Codec(ABC):
    """How one encoding lays out, writes and decodes the ``patches`` dataset."""

    levels: range
    default_level: int

    @abstractmethod
    def create(self, f: h5py.File, n: int, size: int, level: int) -> h5py.Dataset: ...

    @abstractmethod
    def encode(self, patch: np.ndarray, level: int) -> bytes: ...

    @abstractmethod
    def write(self, ds: h5py.Dataset, start: int, encoded: Sequence[bytes]) -> None: ...

    @abstractmethod
    def read(self, ds: h5py.Dataset, indices: np.ndarray) -> np.ndarray: ...

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

    def read(self, ds, indices):
        return np.stack([np.asarray(Image.open(io.BytesIO(ds[int(i)].tobytes())).convert("RGB"))
                         for i in indices])

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

    def read(self, ds, indices):
        return np.stack([ds[int(i)] for i in indices])

    def layout_problem(self, ds, n, size):
        if ds.dtype != np.uint8 or ds.shape != (n, size, size, 3):
            return f"deflate patches must be uint8 ({n}, {size}, {size}, 3), found {ds.shape}"
        if n and ds.chunks != (1, size, size, 3):
            return f"patches must be chunked one patch per chunk, found {ds.chunks}"
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


def read_patches(f: h5py.File, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """Decode patches ``indices`` of an open bag to uint8 (k, P, P, 3), whatever the encoding."""
    ds = f["patches"]
    return CODECS[ds.attrs["encoding"]].read(ds, np.asarray(indices, np.int64))


class BagWriter:
    """Writes one bag: create with all coordinates known, add encoded patches, then commit.

    Patches arrive as pre-encoded chunks so that compression can run in worker processes;
    the writer only copies bytes into the file. Used as a context manager it commits on
    success and deletes the temporary file on any exception, Ctrl-C included.
    """

    def __init__(self, path: str | Path, attributes: BagAttributes, geometry: PatchGeometry,
                 coords: np.ndarray, tissue_fraction: np.ndarray,
                 encoding: PatchEncoding | None = None) -> None:
        self.path = Path(path)
        self._tmp = partial_path(self.path)
        n, size = len(coords), geometry.patch_size
        self._written = np.zeros(n, bool)
        self._file = h5py.File(self._tmp, "w")
        f = self._file
        f.attrs.update({**asdict(attributes), "format": FORMAT_NAME,
                        "format_version": FORMAT_VERSION,
                        "slidefed_version": version("slidefed")})
        ds = f.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(n, 2))
        ds.attrs.update({"patch_level": attributes.read_level, "patch_size": geometry.read_size,
                         "patch_size_level0": geometry.step_level0})
        f.create_dataset("tissue_fraction", data=np.asarray(tissue_fraction, np.float32))
        encoding = encoding or PatchEncoding()
        self._codec = CODECS[encoding.name]
        patches = self._codec.create(f, n, size, encoding.level)
        patches.attrs.update({"encoding": encoding.name, "encoding_level": encoding.level,
                              "patch_size": size, "color": "RGB"})
        self._patches = patches

    def write_chunks(self, start: int, chunks: Sequence[bytes]) -> None:
        """Store encoded patches ``start .. start + len(chunks) - 1``."""
        self._codec.write(self._patches, start, chunks)
        self._written[start:start + len(chunks)] = True

    def commit(self) -> Path:
        """Close the file and rename it into place; every patch must have been written."""
        missing = np.flatnonzero(~self._written)
        if len(missing):
            self.abort()
            raise BagError(self.path, f"{len(missing)} patches were never written")
        self._file.close()
        os.replace(self._tmp, self.path)
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
    """Check ``path`` against the bag format; return its number of patches.

    Raises :class:`BagError` with the first problem found. The shallow check reads the
    metadata and decodes the last patch (a truncated file fails there); ``deep`` decodes all.
    """
    path = Path(path)
    if not path.is_file():
        raise BagError(path, "bag not found")
    if not h5py.is_hdf5(path):
        raise BagError(path, "not an HDF5 file")
    try:
        with h5py.File(path, "r") as f:
            return _check_open_bag(path, f, deep)
    except (OSError, KeyError, ValueError, Image.UnidentifiedImageError) as exc:
        raise BagError(path, f"unreadable bag ({exc})") from exc


def _check_open_bag(path: Path, f: h5py.File, deep: bool) -> int:
    def fail(reason: str) -> None:
        raise BagError(path, reason)

    missing = [a for a in ROOT_ATTRIBUTES if a not in f.attrs]
    if missing:
        fail(f"missing root attributes {missing}")
    if f.attrs["format"] != FORMAT_NAME:
        fail(f"format is {f.attrs['format']!r}, expected {FORMAT_NAME!r}")
    if int(f.attrs["format_version"]) != FORMAT_VERSION:
        fail(f"format version {f.attrs['format_version']} is not {FORMAT_VERSION}")
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
    if n:
        xy = coords[()]
        limits = np.array([f.attrs["level0_width"], f.attrs["level0_height"]])
        if (xy < 0).any() or (xy >= limits).any():
            fail("coords fall outside the slide's level-0 dimensions")
        t = tissue[()]
        if (t < 0).any() or (t > 1).any():
            fail("tissue_fraction outside [0, 1]")
        # Decoding is the integrity check: a truncated or corrupt patch raises here.
        for i in range(n) if deep else (n - 1,):
            if codec.read(patches, np.array([i])).shape != (1, size, size, 3):
                fail(f"patch {i} does not decode to {size}x{size} RGB")
    return n

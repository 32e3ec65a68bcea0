"""The patch bag: one HDF5 file per slide, readable with h5py alone (format version 1).

Layout (DESIGN.md):

- ``coords`` int64 (N, 2): level-0 (x, y) of each patch's top-left corner. Attributes
  ``patch_level`` and ``patch_size`` follow CLAM (Lu et al., Nat. Biomed. Eng. 2021): the
  pyramid level read and the patch side *at that level*, so CLAM-style tools re-read the same
  regions; ``patch_size_level0`` (TRIDENT's name) is the side in level-0 pixels.
- ``patches`` uint8 (N, P, P, 3): RGB pixels at the target resolution, one HDF5 chunk per patch
  compressed with HDF5's standard deflate filter, so any HDF5 reader decodes them.
- ``tissue_fraction`` float32 (N,).
- Root attributes: see :data:`ROOT_ATTRIBUTES`.

A bag is written under a hidden temporary name and renamed into place when complete: it
either exists whole or not at all.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import h5py
import numpy as np

from .atomic import partial_path

FORMAT_NAME = "slidefed-bag"
FORMAT_VERSION = 1
ENCODING = "deflate"
DEFAULT_COMPRESSION_LEVEL = 1


class BagError(Exception):
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


def encode_patch(patch: np.ndarray, level: int = DEFAULT_COMPRESSION_LEVEL) -> bytes:
    """One patch as the bytes of its HDF5 chunk (zlib stream = HDF5's deflate filter)."""
    return zlib.compress(np.ascontiguousarray(patch, dtype=np.uint8).tobytes(), level)


class BagWriter:
    """Writes one bag: create with all coordinates known, add encoded patches, then commit.

    Patches arrive as pre-encoded chunks so that compression can run in worker processes;
    the writer only copies bytes into the file. Used as a context manager it commits on
    success and deletes the temporary file on any exception, Ctrl-C included.
    """

    def __init__(self, path: str | Path, attributes: BagAttributes, geometry: PatchGeometry,
                 coords: np.ndarray, tissue_fraction: np.ndarray,
                 compression_level: int = DEFAULT_COMPRESSION_LEVEL) -> None:
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
        patches = f.create_dataset("patches", shape=(n, size, size, 3), dtype=np.uint8,
                                   chunks=(1, size, size, 3) if n else None,
                                   compression="gzip" if n else None,
                                   compression_opts=compression_level if n else None)
        patches.attrs.update({"encoding": ENCODING, "compression_level": compression_level,
                              "color": "RGB"})
        self._patches = patches

    def write_chunks(self, start: int, chunks: Sequence[bytes]) -> None:
        """Store encoded patches ``start .. start + len(chunks) - 1``."""
        dsid = self._patches.id
        for i, chunk in enumerate(chunks, start):
            dsid.write_direct_chunk((i, 0, 0, 0), chunk)
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


@contextmanager
def open_bag(path: str | Path) -> Iterator[h5py.File]:
    """Open a bag read-only after checking that it is one (cheap checks only)."""
    path = Path(path)
    check_bag(path, deep=False)
    with h5py.File(path, "r") as f:
        yield f


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
    except (OSError, KeyError, ValueError) as exc:
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
    if patches.dtype != np.uint8 or patches.ndim != 4 or patches.shape[0] != n \
            or patches.shape[3] != 3 or patches.shape[1] != patches.shape[2]:
        fail(f"patches must be uint8 (N, P, P, 3) with N={n}, found {patches.dtype} "
             f"{patches.shape}")
    if patches.attrs.get("encoding") != ENCODING:
        fail(f"patches encoding {patches.attrs.get('encoding')!r} is not {ENCODING!r}")
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
        if patches.chunks != (1, *patches.shape[1:]):
            fail(f"patches must be chunked one patch per chunk, found {patches.chunks}")
        # Decoding is the integrity check: a truncated or corrupt chunk raises here.
        for i in range(n) if deep else (n - 1,):
            if patches[i].shape != patches.shape[1:]:
                fail(f"patch {i} decodes to the wrong shape")
    return n

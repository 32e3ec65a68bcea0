"""A hospital's preprocessing output: the folder layout and the manifest, one home for both.

``slidefed preprocess`` writes, per hospital::

    manifest.csv          one row per slide file: MANIFEST_COLUMNS
    bags/<slide_id>.h5    the slide's patch bag (``wsi.bag``)
    qc/<slide_id>.png     its QC picture

The manifest's ``status`` is ``ok`` or ``failed`` (``error`` says why, in one line); the engine
trains on the ``ok`` rows. Every reader and writer of these files takes the names from here.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

MANIFEST = "manifest.csv"
BAGS = "bags"
QC = "qc"
MANIFEST_COLUMNS = ("slide_id", "path", "label", "status", "n_patches", "mpp", "mpp_source",
                    "error")
OK, FAILED = "ok", "failed"


class ManifestError(ValueError):
    """A manifest that cannot be read; ``str()`` is one line naming the file."""


def manifest_path(hospital_dir: Path) -> Path:
    return Path(hospital_dir) / MANIFEST


def bag_path(hospital_dir: Path, slide_id: str) -> Path:
    """Where the bag of ``slide_id`` lies in a hospital's output."""
    return Path(hospital_dir) / BAGS / f"{slide_id}.h5"


def read_manifest_rows(path: Path, required: tuple[str, ...]
                       ) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of every row of the manifest at ``path`` (a BOM is allowed); a
    ``ManifestError`` naming the file if a ``required`` column is missing."""
    with Path(path).open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or ())]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}")
        yield from enumerate(reader, start=2)

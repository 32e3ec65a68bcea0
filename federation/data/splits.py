"""Train / validation / test splits of one hospital's slides: by slide, stratified, seeded.

Patches of one slide are never in two splits: the split is drawn over slide ids, so a model
is always judged on slides it has not seen. Within each label the slides are shuffled by a
generator seeded from the run seed and the hospital's name, and ``n_c · fraction`` (halves
rounded up) of each label go to test and to validation (the rest train, at least one), so
every split keeps the hospital's label mix as far as whole slides allow.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from formats.atomic import atomic_path

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SPLIT_COLUMNS = ("hospital", "slide_id", "split")


class SplitError(ValueError):
    """Slides that cannot be split as asked; ``str()`` is one line."""


def split_slides(
    slide_ids: Sequence[str],
    labels: Sequence[int],
    *,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    hospital: str = "",
) -> dict[str, str]:
    """slide id -> ``train`` | ``validation`` | ``test``, stratified by ``labels``."""
    if len(set(slide_ids)) != len(slide_ids):
        raise SplitError(f"{hospital}: slide ids are not unique")
    if not (validation_fraction >= 0 and test_fraction >= 0
            and validation_fraction + test_fraction < 1):
        raise SplitError(f"{hospital}: validation_fraction {validation_fraction} + "
                         f"test_fraction {test_fraction} must be below 1")
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels)
    assignment: dict[str, str] = {}
    for label in sorted(set(labels_array.tolist())):
        members = [slide_ids[i] for i in np.flatnonzero(labels_array == label)]
        order = rng.permutation(len(members))
        n_test = _round_half_up(len(members) * test_fraction)
        n_validation = _round_half_up(len(members) * validation_fraction)
        if n_test + n_validation >= len(members):  # keep at least one slide to train on
            n_validation = max(0, len(members) - 1 - n_test)
            n_test = min(n_test, len(members) - 1)
        for rank, position in enumerate(order):
            split = ("test" if rank < n_test else
                     "validation" if rank < n_test + n_validation else "train")
            assignment[members[position]] = split
    for split in SPLITS:
        present = {int(labels_array[i]) for i, s in enumerate(slide_ids)
                   if assignment[s] == split}
        if split != "train" and (validation_fraction if split == "validation"
                                 else test_fraction) == 0:
            continue
        if len(present) < 2:
            log.warning("%s: the %s split holds slides of label %s only; its AUC is undefined "
                        "and reported as nan", hospital, split, sorted(present) or "none")
    return {s: assignment[s] for s in slide_ids}


def _round_half_up(value: float) -> int:
    # Python's round() rounds halves to even (round(0.5) == 0), which would give 2 slides of a
    # label and a fraction of 0.25 no test slide.
    return math.floor(value + 0.5)


def write_splits(path: Path, hospital: str, splits: Mapping[str, str]) -> None:
    """``splits.csv`` (``hospital, slide_id, split``), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(SPLIT_COLUMNS)
        for slide_id, split in splits.items():
            writer.writerow((hospital, slide_id, split))


def read_splits(path: Path) -> dict[str, str]:
    """slide id -> split, from a ``splits.csv``."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != SPLIT_COLUMNS:
            raise SplitError(f"{path}: expected columns {', '.join(SPLIT_COLUMNS)}")
        rows = {row["slide_id"]: row["split"] for row in reader}
    unknown = sorted({s for s in rows.values() if s not in SPLITS})
    if unknown:
        raise SplitError(f"{path}: unknown split name(s) {unknown}")
    return rows

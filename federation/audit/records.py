"""Which records an image run's audit calls members and non-members: ``audit_records.csv``.

A hospital's process writes ``hospitals/<h>/audit_records.csv`` when the run sets records
aside for the audit (``audit.holdout``, ``audit.canaries``): one row per record,
``hospital, set, record, label, membership``, where

- ``set`` is ``holdout`` (members: the client's training images; non-members: images of
  the same label distribution that no client trains on) or ``canary`` (mislabelled images:
  members were trained on with that label, non-members never; Jagielski et al. 2020);
- ``record`` indexes the data set's training split;
- ``label`` is the label the record was (or would have been) trained with: its own for a
  holdout record, a wrong one for a canary. The audit checks both against the images it
  reads back, so a different data root is caught;
- ``membership`` is ``member`` or ``nonmember``.

Slide runs need no such file: their ``splits.csv`` says which slides were trained on.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from federation.run_files import AUDIT_RECORDS_COLUMNS, read_rows
from formats.atomic import atomic_path

MEMBERSHIPS = ("member", "nonmember")
SETS = ("holdout", "canary")

Records = dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
"""``{set: {membership: (record indices, labels)}}``."""


class RecordsError(ValueError):
    """An unusable ``audit_records.csv``; ``str()`` is one line naming the file."""


def write_audit_records(path: Path, hospital: str, records: Records) -> None:
    """Write ``records`` as ``path`` (atomically)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(AUDIT_RECORDS_COLUMNS)
        for kind, sets in records.items():
            for membership in MEMBERSHIPS:
                for record, label in zip(*sets[membership], strict=True):
                    writer.writerow((hospital, kind, int(record), int(label), membership))


def read_audit_records(path: Path) -> Records:
    """The records of ``path``: in each set, members and non-members both present and
    disjoint."""
    try:
        rows = read_rows(path, AUDIT_RECORDS_COLUMNS)
    except FileNotFoundError:
        raise RecordsError(f"{path}: not found; only a run with audit.holdout or "
                           "audit.canaries > 0 can be audited (rerun it with --set "
                           "audit.holdout=1000)") from None
    except (csv.Error, UnicodeDecodeError, ValueError) as error:
        raise RecordsError(str(error) if str(error).startswith(str(path))
                           else f"{path}: {error}") from None
    found: dict[str, dict[str, tuple[list[int], list[int]]]] = {}
    for line, row in rows:
        if row["set"] not in SETS or row["membership"] not in MEMBERSHIPS:
            raise RecordsError(f"{path}: line {line}: set {row['set']!r} / membership "
                               f"{row['membership']!r} is not one of {SETS} / {MEMBERSHIPS}")
        try:
            record, label = int(row["record"]), int(row["label"])
        except ValueError:
            raise RecordsError(f"{path}: line {line}: record and label must be whole "
                               "numbers") from None
        lists = found.setdefault(row["set"], {m: ([], []) for m in MEMBERSHIPS})
        lists[row["membership"]][0].append(record)
        lists[row["membership"]][1].append(label)
    if not found:
        raise RecordsError(f"{path}: no records")
    result: Records = {}
    for kind, lists in found.items():
        result[kind] = {m: (np.array(r, dtype=np.int64), np.array(y, dtype=np.int64))
                        for m, (r, y) in lists.items()}
        for membership, (records, _) in result[kind].items():
            if not len(records):
                raise RecordsError(f"{path}: no {kind} {membership} records")
        if np.intersect1d(result[kind]["member"][0], result[kind]["nonmember"][0]).size:
            raise RecordsError(f"{path}: a {kind} record is listed as both member and "
                               "nonmember")
    return result

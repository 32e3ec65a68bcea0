"""Which records an image run's audit calls members and non-members: ``audit_records.csv``.

A hospital's process writes ``hospitals/<h>/audit_records.csv`` when the run holds records
out for the audit (``audit.holdout``): one row per record, ``hospital, record, label,
membership``, where ``record`` indexes the data set's training split, ``label`` is its label
(checked when the audit reads the images back, so a different data root is caught) and
``membership`` is ``member`` (the client trains on it) or ``nonmember`` (no client does).
Slide runs need no such file: their ``splits.csv`` says which slides were trained on.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from federation.run_files import AUDIT_RECORDS_COLUMNS, read_rows
from slidefed.atomic import atomic_path

MEMBERSHIPS = ("member", "nonmember")


class RecordsError(ValueError):
    """An unusable ``audit_records.csv``; ``str()`` is one line naming the file."""


Records = dict[str, tuple[np.ndarray, np.ndarray]]
"""``{membership: (record indices, labels)}``, membership ``member`` or ``nonmember``."""


def write_audit_records(path: Path, hospital: str, records: Records) -> None:
    """Write ``records`` as ``path`` (atomically)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(AUDIT_RECORDS_COLUMNS)
        for membership in MEMBERSHIPS:
            for record, label in zip(*records[membership], strict=True):
                writer.writerow((hospital, int(record), int(label), membership))


def read_audit_records(path: Path) -> Records:
    """The records of ``path``; members and non-members must be disjoint and both present."""
    try:
        rows = read_rows(path, AUDIT_RECORDS_COLUMNS)
    except FileNotFoundError:
        raise RecordsError(f"{path}: not found; only a run with audit.holdout > 0 can be "
                           "audited (rerun it with --set audit.holdout=1000)") from None
    except (csv.Error, UnicodeDecodeError, ValueError) as error:
        raise RecordsError(f"{path}: {error}" if not str(error).startswith(str(path))
                           else str(error)) from None
    found: dict[str, tuple[list[int], list[int]]] = {m: ([], []) for m in MEMBERSHIPS}
    for line, row in rows:
        if row["membership"] not in found:
            raise RecordsError(f"{path}: line {line}: membership {row['membership']!r} is not "
                               "member or nonmember")
        try:
            record, label = int(row["record"]), int(row["label"])
        except ValueError:
            raise RecordsError(f"{path}: line {line}: record and label must be whole "
                               "numbers") from None
        found[row["membership"]][0].append(record)
        found[row["membership"]][1].append(label)
    result = {m: (np.array(r, dtype=np.int64), np.array(y, dtype=np.int64))
              for m, (r, y) in found.items()}
    for membership, (records, _) in result.items():
        if not len(records):
            raise RecordsError(f"{path}: no {membership} records")
    if np.intersect1d(result["member"][0], result["nonmember"][0]).size:
        raise RecordsError(f"{path}: a record is listed as both member and nonmember")
    return result

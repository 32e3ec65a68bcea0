"""Write files so that they either exist whole or not at all."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL_INFIX = ".partial-"


def partial_path(path: Path) -> Path:
    """The hidden temporary name ``path`` is written under before it is renamed into place."""
    return path.with_name(f".{path.name}{PARTIAL_INFIX}{os.getpid()}")


def remove_stale_partials(path: Path) -> list[Path]:
    """Delete temporaries that interrupted writes of ``path`` left behind (e.g. after SIGKILL)."""
    stale = sorted(path.parent.glob(f".{path.name}{PARTIAL_INFIX}*"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def make_directory(path: Path) -> Path:
    """``mkdir -p path``; a file standing where a directory should be is an OS error naming
    it (``mkdir`` alone says only "File exists")."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(errno.ENOTDIR, "is a file, not a directory", str(path)) from None
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to ``path`` on success, delete it on error."""
    path = Path(path)
    make_directory(path.parent)
    tmp = partial_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

"""The one rule by which an exception becomes the one line a user reads.

Every command, manifest row and log line that reports a failure uses ``one_line``, so an
error reads the same wherever it surfaces: an OS error as ``<file>: <reason>`` (the file the
system named, not a traceback), anything else as its message on one line.
"""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """``exc`` as one line: ``<file>: <reason>`` for an OS error that names a file, else its
    message with all whitespace (newlines included) collapsed to single spaces, or its type's
    name when it has no message."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return " ".join(str(exc).split()) or type(exc).__name__

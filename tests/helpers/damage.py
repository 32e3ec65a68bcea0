"""Damaged copies of slide files, made by the tests that need them."""

from __future__ import annotations

from pathlib import Path

import tifffile


def zero_tile_data(source: Path, target: Path, page: int = 0,
                   tiles: slice = slice(None)) -> Path:
    """Copy ``source`` to ``target`` with the JPEG data of ``tiles`` of TIFF page ``page``
    zeroed, as a bad disk or an interrupted copy leaves it."""
    data = bytearray(source.read_bytes())
    with tifffile.TiffFile(source) as tif:
        spans = list(zip(tif.pages[page].dataoffsets, tif.pages[page].databytecounts,
                         strict=True))[tiles]
    for offset, count in spans:
        data[offset:offset + count] = bytes(count)
    target.write_bytes(bytes(data))
    return target

"""Read patches at a target resolution, many at a time.

One OpenSlide ``read_region`` call per patch spends much of its time in per-call overhead.
Kept patches are read instead as horizontal *runs* of neighbouring grid cells, one region per
run: the same tiles are decoded (a run holds only kept cells, so nothing is read in vain)
with a fraction of the calls.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .resolution import ReadPlan
from .slide import Slide

# A run is at most this many pixels wide at the read level (bounded memory per read).
RUN_READ_PX = 4096


def max_run_length(plan: ReadPlan) -> int:
    """Grid cells per run for ``plan``."""
    return max(1, RUN_READ_PX // plan.read_size)


def split_runs(coords: np.ndarray, step: int, max_length: int) -> list[slice]:
    """Slices of row-major ``coords`` that are runs of adjacent cells in one grid row."""
    if len(coords) == 0:
        return []
    cells = coords // step
    breaks = (np.diff(cells[:, 1]) != 0) | (np.diff(cells[:, 0]) != 1)
    starts = [0, *(np.flatnonzero(breaks) + 1).tolist(), len(coords)]
    runs = []
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        runs.extend(slice(s, min(s + max_length, b)) for s in range(a, b, max_length))
    return runs


def read_patch_run(slide: Slide, plan: ReadPlan, coords: np.ndarray) -> np.ndarray:
    """Patches (n, P, P, 3) for a run of adjacent, grid-aligned level-0 ``coords`` in one row.

    The run is read as one region at ``plan.read_level``; when that level is not the target
    resolution the region is resized once (a box filter for whole-number factors,
    anti-aliased bilinear otherwise) before it is cut, so patch borders are resampled exactly
    like their interiors.
    """
    n, size = len(coords), plan.patch_size
    origin = (int(coords[0, 0]), int(coords[0, 1]))
    image = slide.read_region_image(origin, plan.read_level, (n * plan.read_size,
                                                              plan.read_size))
    if plan.needs_resize:
        factor, remainder = divmod(plan.read_size, size)
        image = image.reduce(factor) if remainder == 0 else image.resize(
            (n * size, size), Image.Resampling.BILINEAR)
    row = np.asarray(image)
    return row.reshape(size, n, size, 3).swapaxes(0, 1)

"""Read patches at a target resolution, many at a time.

One OpenSlide ``read_region`` call per patch spends much of its time in per-call overhead;
reading the bounding region of a block of grid cells once and cutting it into patches decodes
the same tiles with a fraction of the calls.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .resolution import ReadPlan
from .slide import Slide

# Blocks are at most this many pixels per side at the read level (bounded memory per read).
BLOCK_READ_PX = 2048


def block_patches(plan: ReadPlan) -> int:
    """Grid cells per block side for ``plan``."""
    return max(1, BLOCK_READ_PX // plan.read_size)


def read_patch_block(slide: Slide, plan: ReadPlan, coords: np.ndarray) -> np.ndarray:
    """Patches (len(coords), P, P, 3) for grid-aligned level-0 ``coords`` read in one region.

    The bounding region of the cells is read once at ``plan.read_level``; when the level is not
    the target resolution, the region is resized once (anti-aliased) before cutting, so patch
    borders are interpolated exactly as the interior.
    """
    cells = coords // plan.step_level0
    first = cells.min(axis=0)
    cols, rows = (cells.max(axis=0) - first + 1).tolist()
    origin = (int(first[0] * plan.step_level0), int(first[1] * plan.step_level0))
    region = slide.read_region(origin, plan.read_level, (cols * plan.read_size,
                                                         rows * plan.read_size))
    size = plan.patch_size
    if plan.needs_resize:
        region = np.asarray(Image.fromarray(region).resize((cols * size, rows * size),
                                                           Image.Resampling.BILINEAR))
    # View the region as a (rows, cols) grid of patches, then pick the requested cells.
    grid = region.reshape(rows, size, cols, size, 3).swapaxes(1, 2)
    offset = cells - first
    return grid[offset[:, 1], offset[:, 0]]

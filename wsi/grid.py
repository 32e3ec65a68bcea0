"""The patch grid: where patches start on level 0 and how much tissue each one covers."""

from __future__ import annotations

import numpy as np


def grid_coords(width: int, height: int, step: int) -> np.ndarray:
    """Level-0 (x, y) top-left corners of every whole ``step``-px patch, row by row."""
    xs = np.arange(0, width - step + 1, step, dtype=np.int64)
    ys = np.arange(0, height - step + 1, step, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def tissue_fractions(mask: np.ndarray, downsample: float, coords: np.ndarray,
                     step: int) -> np.ndarray:
    """Fraction of each patch's footprint that ``mask`` (level-0 / ``downsample``) calls tissue.

    Footprints are mapped onto the mask and averaged with a summed-area table, so the cost is
    independent of the patch size.
    """
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    integral[1:, 1:] = mask.cumsum(0).cumsum(1)
    h, w = mask.shape

    def to_mask(v: np.ndarray, limit: int, rounding) -> np.ndarray:
        return np.clip(rounding(v / downsample).astype(np.int64), 0, limit)

    x0 = to_mask(coords[:, 0], w, np.floor)
    y0 = to_mask(coords[:, 1], h, np.floor)
    x1 = np.maximum(to_mask(coords[:, 0] + step, w, np.ceil), np.minimum(x0 + 1, w))
    y1 = np.maximum(to_mask(coords[:, 1] + step, h, np.ceil), np.minimum(y0 + 1, h))
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return (inside / area).astype(np.float32)


def block_order(coords: np.ndarray, step: int, block_patches: int) -> np.ndarray:
    """Permutation that groups patches by square blocks of ``block_patches``² grid cells.

    Reading one region per block instead of one per patch saves OpenSlide's per-call overhead;
    ordering patches block by block lets each block's patches be written as one contiguous run.
    """
    cell = coords // step
    block = cell // block_patches
    return np.lexsort((cell[:, 0], cell[:, 1], block[:, 0], block[:, 1]))


def split_blocks(coords: np.ndarray, step: int, block_patches: int) -> list[slice]:
    """Contiguous slices of block-ordered ``coords``, one per block."""
    if len(coords) == 0:
        return []
    block = (coords // step) // block_patches
    change = np.flatnonzero(np.any(np.diff(block, axis=0) != 0, axis=1)) + 1
    edges = [0, *change.tolist(), len(coords)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]


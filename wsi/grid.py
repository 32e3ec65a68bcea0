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
    # int32 counts: an overview has far fewer than 2**31 pixels, and sums half as wide are
    # faster. Summed in place: two fresh overview-sized arrays cost as much as the sums.
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int32)
    inner = integral[1:, 1:]
    inner[...] = mask
    np.cumsum(inner, 0, out=inner)
    np.cumsum(inner, 1, out=inner)
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


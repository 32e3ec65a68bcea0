"""Patch grid, tissue fractions and read runs."""

from __future__ import annotations

import numpy as np

from wsi.grid import grid_coords, tissue_fractions
from wsi.patches import split_runs


def test_grid_holds_only_whole_patches_row_by_row():
    coords = grid_coords(1000, 600, 256)
    assert coords.tolist() == [[0, 0], [256, 0], [512, 0], [0, 256], [256, 256], [512, 256]]


def test_tissue_fraction_is_the_covered_share_of_each_footprint():
    mask = np.zeros((10, 20), bool)  # downsample 32: each 64-px patch covers 2x2 mask pixels
    mask[0:2, 0:2] = True  # patch (0, 0): all tissue
    mask[0:2, 2] = True  # patch (64, 0): half tissue
    coords = np.array([[0, 0], [64, 0], [128, 0], [600, 300]])
    fractions = tissue_fractions(mask, 32.0, coords, 64)
    np.testing.assert_allclose(fractions, [1.0, 0.5, 0.0, 0.0])
    assert fractions.dtype == np.float32


def test_tissue_fraction_of_a_random_mask_matches_a_direct_count():
    rng = np.random.default_rng(1)
    mask = rng.random((40, 40)) > 0.6
    coords = grid_coords(40 * 8, 40 * 8, 32)  # 4x4 mask pixels per patch
    direct = [mask[y // 8:y // 8 + 4, x // 8:x // 8 + 4].mean() for x, y in coords]
    np.testing.assert_allclose(tissue_fractions(mask, 8.0, coords, 32), direct, rtol=1e-6)


def test_runs_are_adjacent_cells_of_one_row_and_bounded():
    step = 100
    cells = [(0, 0), (1, 0), (2, 0), (4, 0), (5, 0), (0, 1), (1, 1), (2, 1), (3, 1), (4, 1)]
    coords = np.array(cells) * step
    runs = split_runs(coords, step, max_length=3)
    assert [(r.start, r.stop) for r in runs] == [(0, 3), (3, 5), (5, 8), (8, 10)]
    assert split_runs(coords[:0], step, 3) == []

"""The PNG encoder of QC pictures and heatmaps writes files that decode to their pixels."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from formats.png import png_bytes


def test_png_decodes_to_the_picture():
    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    rgb[10:20] = 250  # runs that compress
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(rgb)))), rgb)

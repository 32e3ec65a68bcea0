"""Quality-control pictures: what the tiler saw and what it kept, one PNG per slide."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from imagecodecs import deflate_encode  # named: loaded now, not in each forked job
from PIL import Image, ImageDraw

from slidefed.atomic import atomic_path
from wsi.tissue import Overview

# QC pictures are scaled to a long side in this range: big enough to judge, small to store.
MIN_SIDE, MAX_SIDE = 800, 1600
TISSUE_OUTLINE = (0, 170, 0)
PATCH_OUTLINE = (20, 60, 230)
INK_OUTLINE = (255, 140, 0)


def _outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` 4-connected steps of a pixel outside it or of the
    picture's edge (``mask`` less its binary erosion), by shifted ANDs: a fifth of the cost
    of SciPy's erosion on a QC picture."""
    inner = mask
    for _ in range(width):
        p = np.pad(inner, 1)
        inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def png_bytes(rgb: np.ndarray) -> bytes:
    """An (h, w, 3) uint8 picture as PNG: every row with the "up" filter, compressed by
    libdeflate at level 1, ~2.5x faster than libpng with zlib at level 1 and no larger (a
    photo-like overview compresses poorly anyway; PIL's default is ~7x slower still)."""
    height, width, _ = rgb.shape
    rows = np.empty((height, 1 + 3 * width), np.uint8)
    rows[:, 0] = 2  # "up": each byte less the one above it, modulo 256
    flat = rgb.reshape(height, 3 * width)
    rows[0, 1:] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", deflate_encode(rows, level=1)) + chunk(b"IEND", b""))


def write_qc_picture(path: str | Path, overview: Overview, coords: np.ndarray,
                     step_level0: int) -> Path:
    """Save the overview with the tissue mask outlined in green, pen marks left out of it in
    orange and kept patches in blue.

    Written to a temporary name and renamed, like every output of the pipeline.
    """
    path = Path(path)
    height, width = overview.mask.shape
    scale = float(np.clip(max(width, height), MIN_SIDE, MAX_SIDE)) / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    picture = np.array(Image.fromarray(overview.rgb).resize(size, Image.Resampling.BILINEAR))
    for region, colour in ((overview.ink, INK_OUTLINE), (overview.mask, TISSUE_OUTLINE)):
        mask = np.asarray(Image.fromarray(region).resize(size, Image.Resampling.NEAREST))
        picture[_outline(mask)] = colour
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    factor = scale / overview.downsample
    for x, y in coords.tolist():
        draw.rectangle([x * factor, y * factor, (x + step_level0) * factor - 1,
                        (y + step_level0) * factor - 1], outline=PATCH_OUTLINE)
    encoded = png_bytes(np.asarray(image))
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded)
    return path

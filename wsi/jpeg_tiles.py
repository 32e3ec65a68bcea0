"""Decode JPEG-tiled TIFF pyramid levels directly, without OpenSlide's compositing.

OpenSlide's ``read_region`` decodes each tile, paints it through cairo in premultiplied ARGB
and converts the result back to RGBA; on this project's machines that costs ~3.9 ms per
256-px JPEG tile, against ~0.4 ms for decoding the same tile with libjpeg-turbo directly
(imagecodecs) into RGB, with identical pixels (tests compare both on real and synthetic
slides). Regions start on whole level pixels (level-0 location / downsample, rounded);
OpenSlide resamples at the sub-pixel offset instead, which differs only on levels whose
downsample is not a whole number. Only levels that are plain tiled JPEG pages of TIFF-based
formats whose layout we test (Aperio, generic tiled TIFF) take this path; everything else
stays with OpenSlide.

For overviews, tiles can also be decoded at 1/2, 1/4 or 1/8 scale with libjpeg's DCT
scaling (through PIL, which exposes it): each pixel is then about the mean of its block, and
the full-resolution pixels are never made.
"""

from __future__ import annotations

import io
import logging
import math
import os
from pathlib import Path

import numpy as np
import tifffile

# Named: imagecodecs loads each codec on first use, which every forked per-slide process of
# a preprocessing job would repeat.
from imagecodecs import Jpeg8Error, jpeg8_decode
from PIL import Image

log = logging.getLogger(__name__)

# OpenSlide vendors whose pyramid levels are tiled pages of the main IFD chain.
VENDORS = ("aperio", "generic-tiff")
_JPEG = 7
_RGB, _YCBCR = 2, 6
# Scales libjpeg's DCT scaling decodes at (1/s) that are whole-number reductions.
DCT_SCALES = (8, 4, 2, 1)


def _adobe_marker(photometric: int) -> bytes:
    """An APP14 "Adobe" segment stating the samples' coding (transform 0: RGB, 1: YCbCr),
    which libjpeg obeys over its guess from the component IDs."""
    return b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00" + bytes([photometric == _YCBCR])


class TileError(Exception):
    """A tile cannot be read or decoded; :class:`~wsi.slide.Slide` adds the file's name."""


class JpegTiledLevel:
    """One pyramid level stored as JPEG tiles in one TIFF page, read with ``os.pread``."""

    def __init__(self, fd: int, page: tifffile.TiffPage) -> None:
        self._fd = fd
        self.width, self.height = page.imagewidth, page.imagelength
        self.tile_width, self.tile_height = page.tilewidth, page.tilelength
        self._tiles_across = math.ceil(self.width / self.tile_width)
        self._offsets = np.asarray(page.dataoffsets, np.int64)
        self._counts = np.asarray(page.databytecounts, np.int64)
        self._tables = page.jpegtables
        # The TIFF photometric tag, not the JPEG stream's markers, says how the samples are
        # coded: Aperio writes RGB-coded JPEG tiles that libjpeg would otherwise take as YCbCr.
        self._colorspace = "RGB" if page.photometric == _RGB else "YCBCR"
        # A whole JPEG stream for PIL is SOI, the coding, the shared tables, then the tile.
        self._stream_head = (b"\xff\xd8" + _adobe_marker(page.photometric)
                             + (self._tables[2:-2] if self._tables else b""))

    def dct_scale(self, x: int, y: int, factor: int) -> int:
        """The largest of :data:`DCT_SCALES` that divides ``factor``, the region's corner
        (x, y) and the tile size, so that scaled tiles tile the scaled region."""
        return next(s for s in DCT_SCALES
                    if not (factor % s or x % s or y % s or self.tile_width % s
                            or self.tile_height % s))

    def read(self, x: int, y: int, width: int, height: int, scale: int = 1) -> np.ndarray:
        """RGB pixels (height, width, 3) of the level's region at (x, y); outside the image
        and in tiles the scanner never wrote, white (as OpenSlide's transparent glass).

        With ``scale`` > 1 (from :meth:`dct_scale`), the region is decoded at 1/``scale``:
        (ceil(height/scale), ceil(width/scale), 3) pixels, each about the mean of its block
        (at an image edge that is no multiple of ``scale``, the last pixels also average the
        tile's padding).
        """
        if self.dct_scale(x, y, scale) != scale:
            raise ValueError(f"scale {scale} does not fit the region at ({x}, {y})")
        out = np.full((-(-height // scale), -(-width // scale), 3), 255, np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, self.width), min(y + height, self.height)
        tw, th = self.tile_width, self.tile_height
        for ty in range(y0 // th, (y1 - 1) // th + 1) if y1 > y0 else ():
            for tx in range(x0 // tw, (x1 - 1) // tw + 1) if x1 > x0 else ():
                index = ty * self._tiles_across + tx
                if self._counts[index] == 0:
                    continue
                tile = self._decode(index, scale)
                # Intersection of this tile with the requested region, in level pixels, then
                # in scaled pixels (every corner but the region's far edges divides by scale).
                left, top = max(x0, tx * tw), max(y0, ty * th)
                right, bottom = min(x1, (tx + 1) * tw), min(y1, (ty + 1) * th)
                left, top, tile_x, tile_y, x_s, y_s = (
                    v // scale for v in (left, top, tx * tw, ty * th, x, y))
                right, bottom = -(-right // scale), -(-bottom // scale)
                if tile.shape[0] < bottom - tile_y or tile.shape[1] < right - tile_x:
                    raise TileError(f"JPEG tile {index} decodes to {tile.shape[1]}x"
                                    f"{tile.shape[0]} px, smaller than its {tw}x{th} tile "
                                    f"at 1/{scale}")
                out[top - y_s:bottom - y_s, left - x_s:right - x_s] = \
                    tile[top - tile_y:bottom - tile_y, left - tile_x:right - tile_x, :3]
        return out

    def _decode(self, index: int, scale: int) -> np.ndarray:
        try:
            data = os.pread(self._fd, int(self._counts[index]), int(self._offsets[index]))
            if scale == 1:
                return jpeg8_decode(data, tables=self._tables,
                                    colorspace=self._colorspace, outcolorspace="RGB")
            with Image.open(io.BytesIO(self._stream_head + data[2:]), formats=("JPEG",)) as im:
                expected = (-(-im.width // scale), -(-im.height // scale))
                im.draft("RGB", (max(1, im.width // scale), max(1, im.height // scale)))
                if im.size != expected:  # PIL scales less a JPEG narrower than the scale
                    raise TileError(f"JPEG tile {index} cannot be decoded at 1/{scale}")
                return np.asarray(im)
        except (Jpeg8Error, OSError, SyntaxError) as exc:
            raise TileError(f"JPEG tile {index} is corrupt or unreadable ({exc})") from None


def _is_plain_jpeg_tiles(page: tifffile.TiffPage) -> bool:
    return (page.is_tiled and page.compression == _JPEG and page.photometric in (_RGB, _YCBCR)
            and page.samplesperpixel == 3 and page.bitspersample == 8
            and page.planarconfig == 1 and page.imagedepth == 1)


class JpegTileReader:
    """The directly decodable levels of one slide file, keyed by OpenSlide level index."""

    def __init__(self, fd: int, levels: dict[int, JpegTiledLevel]) -> None:
        self._fd = fd
        self.levels = levels

    def close(self) -> None:
        os.close(self._fd)


def open_jpeg_tiles(path: Path, vendor: str,
                    level_dimensions: tuple[tuple[int, int], ...]) -> JpegTileReader | None:
    """Direct decoding for the levels of ``path`` that allow it, or None.

    A level qualifies when exactly one plain JPEG-tiled page of the main IFD chain has its
    dimensions; other vendors and files tifffile cannot parse get None (OpenSlide reads them).
    """
    if vendor not in VENDORS:
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            by_size: dict[tuple[int, int], list[tifffile.TiffPage]] = {}
            for page in tif.pages:
                if isinstance(page, tifffile.TiffPage) and _is_plain_jpeg_tiles(page):
                    by_size.setdefault((page.imagewidth, page.imagelength), []).append(page)
            matched = {level: by_size[dims][0] for level, dims in enumerate(level_dimensions)
                       if len(by_size.get(dims, ())) == 1}
            if not matched:
                return None
            fd = os.open(path, os.O_RDONLY)
            levels = {level: JpegTiledLevel(fd, page) for level, page in matched.items()}
    except (tifffile.TiffFileError, OSError, ValueError) as exc:
        log.debug("%s: no direct JPEG decoding (%s)", path, exc)
        return None
    log.debug("%s: levels %s decoded directly", path, sorted(levels))
    return JpegTileReader(fd, levels)

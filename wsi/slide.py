"""Open a whole-slide image with OpenSlide and state exactly what it holds.

A thin, honest wrapper (STYLE.md, "OpenSlide"): levels, downsamples, vendor and the level-0
microns per pixel as the file states them. A slide that states no µm/px, or a placeholder
outside the range of real scanners (:data:`PLAUSIBLE_MPP`), is refused unless the caller
supplies the scanner's level-0 value (``fill_mpp``); a stated value is replaced
only when the caller says so (``override_mpp``); nothing is guessed, and ``mpp_source`` says
which happened.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from .jpeg_tiles import TileError, open_jpeg_tiles

log = logging.getLogger(__name__)

# Anisotropic pixels beyond this relative difference are reported, then the x value is used.
_MPP_XY_TOLERANCE = 0.01
# Level-0 µm/px of real slide scanners: ~0.1 under a 100x oil objective, ~4 for a 2.5x scan.
# A value outside is a placeholder, as the TIFF tags of 72 or 96 dpi (352.8, 264.6 µm/px), a
# converter's default (16.78) or 0 are, and counts as no value.
PLAUSIBLE_MPP = (0.05, 10.0)


class SlideError(ValueError):
    """A slide cannot be used. ``str()`` is one line: ``<path>: <reason>``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Tiling workers raise it in another process; the default pickling would call
        # SlideError(message) and fail, leaving the pool waiting for a result forever.
        return SlideError, (self.path, self.reason)


@dataclass(frozen=True)
class SlideInfo:
    """What a slide file holds, as OpenSlide reports it."""

    path: Path
    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float
    mpp_source: str  # "file", "fill" (the file stated none) or "override"

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def width(self) -> int:
        return self.level_dimensions[0][0]

    @property
    def height(self) -> int:
        return self.level_dimensions[0][1]

    def level_mpp(self, level: int) -> float:
        """Microns per pixel at ``level``."""
        return self.mpp * self.level_downsamples[level]


def _parse_mpp(path: Path, properties: Mapping[str, str]) -> tuple[float | None, str]:
    """The level-0 µm/px the file states, or None and why there is none to use."""
    raw_x = properties.get(openslide.PROPERTY_NAME_MPP_X)
    if raw_x is None:
        return None, "slide states no microns per pixel"
    try:
        mpp_x = float(raw_x)
        mpp_y = float(properties.get(openslide.PROPERTY_NAME_MPP_Y, raw_x))
    except ValueError:
        return None, f"slide states an unreadable microns per pixel ({raw_x!r})"
    if not (math.isfinite(mpp_x) and PLAUSIBLE_MPP[0] <= mpp_x <= PLAUSIBLE_MPP[1]):
        return None, (f"slide's stated {mpp_x:g} µm/px looks like a placeholder (scanners give "
                      f"{PLAUSIBLE_MPP[0]:g}-{PLAUSIBLE_MPP[1]:g})")
    if abs(mpp_x - mpp_y) > _MPP_XY_TOLERANCE * mpp_x:
        log.warning("%s: anisotropic pixels (mpp-x %g, mpp-y %g); using mpp-x", path, mpp_x, mpp_y)
    return mpp_x, ""


# File signatures, to say more than "unsupported" when a slide-like file fails to open.
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _unsupported_reason(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(132)
    if not head:
        return "empty file"
    if head[:4] in _TIFF_MAGICS:
        return "TIFF file that OpenSlide cannot read (truncated, corrupt, or not a tiled slide)"
    if head[128:132] == b"DICM":
        return "DICOM file that OpenSlide cannot read (not a WSI, or its series is incomplete)"
    return "not a slide format OpenSlide can read"


class Slide:
    """An open slide. Use as a context manager, or call :meth:`close`.

    ``properties`` are OpenSlide's, as the file states them. Regions come back as RGB
    ``uint8`` arrays; areas the scanner did not image (transparent in
    OpenSlide) are composited onto white, the colour of an empty glass slide.
    """

    def __init__(self, path: str | Path, fill_mpp: float | None = None,
                 override_mpp: float | None = None) -> None:
        path = Path(path)
        if not path.exists():
            raise SlideError(path, "file not found")
        if path.is_dir():
            raise SlideError(path, "is a directory, not a slide file")
        for option, value in (("--fill-mpp", fill_mpp), ("--override-mpp", override_mpp)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise SlideError(path, f"{option} must be a positive number, got {value}")
        try:
            self._osr = openslide.OpenSlide(path)
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideError(path, _unsupported_reason(path)) from exc
        except openslide.OpenSlideError as exc:
            raise SlideError(path, f"corrupt or unreadable slide ({exc})") from exc
        self.properties: dict[str, str] = dict(self._osr.properties)
        try:
            self.info = self._describe(path, fill_mpp, override_mpp)
        except BaseException:
            self._osr.close()
            raise
        self._jpeg = open_jpeg_tiles(path, self.info.vendor, self.info.level_dimensions)

    def _describe(self, path: Path, fill_mpp: float | None,
                  override_mpp: float | None) -> SlideInfo:
        properties = self._osr.properties
        if override_mpp is not None:
            log.info("%s: --override-mpp %g replaces the file's %s", path, override_mpp,
                     properties.get(openslide.PROPERTY_NAME_MPP_X, "(none)"))
            mpp, source = override_mpp, "override"
        else:
            file_mpp, missing = _parse_mpp(path, properties)
            if file_mpp is not None:
                mpp, source = file_mpp, "file"
            elif fill_mpp is None:
                raise SlideError(path, f"{missing}; pass --fill-mpp with the scanner's level-0 "
                                       "value")
            else:
                if properties.get(openslide.PROPERTY_NAME_MPP_X) is not None:
                    log.warning("%s: %s; using --fill-mpp %g", path, missing, fill_mpp)
                mpp, source = fill_mpp, "fill"
        return SlideInfo(
            path=path,
            vendor=properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown"),
            level_dimensions=tuple(self._osr.level_dimensions),
            level_downsamples=tuple(float(d) for d in self._osr.level_downsamples),
            mpp=mpp,
            mpp_source=source,
        )

    def read_region_image(self, location: tuple[int, int], level: int,
                          size: tuple[int, int]) -> Image.Image:
        """Read ``size`` (w, h) pixels at ``level`` whose top-left is level-0 ``location``, as
        an RGB image (PIL, so that resizing and cutting happen before any array copy)."""
        try:
            if self._jpeg is not None and level in self._jpeg.levels:
                return Image.fromarray(self._read_direct(location, level, size, 1))
            rgba = self._osr.read_region(location, level, size)
        except (openslide.OpenSlideError, TileError) as exc:
            raise self._read_error(location, level, exc) from exc
        if rgba.getchannel("A").getextrema()[0] < 255:  # pixels not imaged: show them as glass
            rgba = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)),
                                         rgba)
        return rgba.convert("RGB")

    def read_region(self, location: tuple[int, int], level: int,
                    size: tuple[int, int]) -> np.ndarray:
        """:meth:`read_region_image` as an (h, w, 3) uint8 array."""
        return np.asarray(self.read_region_image(location, level, size))

    def read_region_reduced(self, location: tuple[int, int], level: int,
                            size: tuple[int, int], factor: int) -> np.ndarray:
        """:meth:`read_region` box-averaged down by ``factor``: (ceil(h/factor),
        ceil(w/factor), 3) pixels, each the mean of its block, cut short at the region's edge.

        Directly decoded levels are decoded at 1/2, 1/4 or 1/8 scale where ``factor`` and the
        region's corner allow (:meth:`~wsi.jpeg_tiles.JpegTiledLevel.dct_scale`), with pixels
        within a few levels of the box means; the rest of the factor is box-averaged.
        """
        scale = 1
        if self._jpeg is not None and level in self._jpeg.levels:
            scale = self._jpeg.levels[level].dct_scale(*self._level_xy(location, level), factor)
        if scale == 1:
            return np.asarray(self.read_region_image(location, level, size).reduce(factor))
        try:
            pixels = self._read_direct(location, level, size, scale)
        except TileError as exc:
            raise self._read_error(location, level, exc) from exc
        rest = factor // scale
        return pixels if rest == 1 else np.asarray(Image.fromarray(pixels).reduce(rest))

    def _level_xy(self, location: tuple[int, int], level: int) -> tuple[int, int]:
        downsample = self.info.level_downsamples[level]
        return round(location[0] / downsample), round(location[1] / downsample)

    def _read_direct(self, location: tuple[int, int], level: int, size: tuple[int, int],
                     scale: int) -> np.ndarray:
        assert self._jpeg is not None
        return self._jpeg.levels[level].read(*self._level_xy(location, level), *size, scale)

    def _read_error(self, location: tuple[int, int], level: int, exc: Exception) -> SlideError:
        return SlideError(self.info.path, f"cannot read region at {location} level {level} "
                                          f"({exc})")

    def close(self) -> None:
        self._osr.close()
        if self._jpeg is not None:
            self._jpeg.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_slide(path: str | Path, fill_mpp: float | None = None,
               override_mpp: float | None = None) -> Slide:
    """Open ``path`` with OpenSlide; raise :class:`SlideError` naming the file if unusable.

    ``fill_mpp`` is the level-0 µm/px of a file that states none; ``override_mpp`` replaces
    whatever the file states."""
    return Slide(path, fill_mpp, override_mpp)

"""Find tissue on a low-resolution overview of a slide.

Saturation separates stained tissue from glass: H&E stains are coloured, glass and dust are
grey. Otsu's threshold (Otsu, IEEE Trans. SMC 1979) on the saturation channel adapts to each
slide's staining; morphology then closes gaps inside tissue and drops specks and holes, as in
CLAM's segmentation (Lu et al., Nat. Biomed. Eng. 2021) but on µm-based sizes so that it means
the same on every scanner.

Marker pen is coloured too, so it passes a saturation threshold. Blue and green ink is
recognised by its hue, as HistoQC's pen-marking filters do (Janowczyk et al., JCO Clinical
Cancer Informatics 2019): green exceeds red in it, which it never does in hematoxylin (whose
hue stays above about 245°) or eosin. Only ink regions of a pen stroke's size count, so
that specks of tissue-marking dye or colour fringes at tissue edges are left alone. Red ink
looks like eosin and is not detected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import morphology

# Named, not reached through skimage's lazily loaded ``filters``: a preprocessing job forks
# one process per slide after its imports, and each child would otherwise import it again.
from skimage.filters import threshold_otsu

from .slide import Slide, SlideInfo

# Overview resolution: a 256-px patch at 0.5 µm/px covers 8x8 overview pixels at 16 µm/px.
# Small slides get a finer overview so that it still has at least this many pixels on its long
# side (a 64-µm patch then spans 20 or more overview pixels on a slide of up to 1.6 mm); the
# mask's cost grows with its pixels, and on a small slide it is most of the per-slide overhead.
OVERVIEW_MPP = 16.0
MIN_OVERVIEW_SIDE = 512
# Otsu's threshold is clamped: on an all-glass slide it would pick noise, on an all-tissue one
# it would split tissue into light and dark halves.
MIN_SATURATION, MAX_SATURATION = 0.05, 0.15
# Nearly black pixels (slide edges, dust, folds under a dark mark) are not tissue.
MIN_VALUE = 0.15
# Objects and holes smaller than this are specks and gaps, not tissue or lumen (0.02 mm²).
MIN_AREA_UM2 = 20_000.0
# Gaps narrower than about twice this radius inside tissue are closed.
CLOSING_RADIUS_UM = 32.0
# A closing radius longer than this many pixels is applied on a coarser mask (see _closing).
CLOSING_GRID_RADIUS = 16
# Blue and green marker ink: hues from green to blue (degrees), saturated at least this much,
# in regions of at least this area (a stroke 0.25 mm wide and 0.4 mm long).
INK_HUES = (90.0, 230.0)
INK_MIN_SATURATION = 0.15
INK_MIN_AREA_UM2 = 100_000.0
# Overview blocks are read in pieces of this many pixels per side so memory stays bounded
# even on a slide with no pyramid.
READ_BLOCK = 4096


@dataclass(frozen=True)
class Overview:
    """A low-resolution RGB picture of the whole slide and its tissue mask."""

    rgb: np.ndarray  # (h, w, 3) uint8
    mask: np.ndarray  # (h, w) bool
    downsample: float  # level-0 pixels per overview pixel
    ink: np.ndarray  # (h, w) bool: blue or green pen marks, never in ``mask``


def overview_mpp(info: SlideInfo) -> float:
    """Overview resolution for a slide: :data:`OVERVIEW_MPP`, finer for small slides."""
    long_side_um = max(info.width, info.height) * info.mpp
    return max(info.mpp, min(OVERVIEW_MPP, long_side_um / MIN_OVERVIEW_SIDE))


def read_overview_rgb(slide: Slide, overview_mpp: float) -> tuple[np.ndarray, float]:
    """Read the whole slide at about ``overview_mpp`` µm/px, block by block.

    Reads the coarsest level no coarser than ``overview_mpp`` and box-averages it down by the
    largest power of two that does not pass it (:meth:`~wsi.slide.Slide.read_region_reduced`:
    JPEG tiles are decoded at 1/2, 1/4 or 1/8 scale, which a power of two always allows).
    Returns the picture and its downsample relative to level 0.
    """
    info = slide.info
    candidates = [lv for lv in range(info.level_count) if info.level_mpp(lv) <= overview_mpp]
    level = max(candidates, key=info.level_mpp) if candidates else info.level_count - 1
    factor = 2 ** max(0, math.floor(math.log2(overview_mpp / info.level_mpp(level))))
    block = READ_BLOCK - READ_BLOCK % factor
    width, height = info.level_dimensions[level]
    out = np.empty((math.ceil(height / factor), math.ceil(width / factor), 3), np.uint8)
    level_ds = info.level_downsamples[level]
    for y in range(0, height, block):
        for x in range(0, width, block):
            size = (min(block, width - x), min(block, height - y))
            small = slide.read_region_reduced((round(x * level_ds), round(y * level_ds)), level,
                                              size, factor)
            out[y // factor: y // factor + small.shape[0],
                x // factor: x // factor + small.shape[1]] = small
    return out, level_ds * factor


def _exact_closing(mask: np.ndarray, radius: float) -> np.ndarray:
    # Morphological closing with a disk, via Euclidean distance transforms: the same result as
    # dilation then erosion with a disk, at a cost independent of the radius.
    dilated = ndimage.distance_transform_edt(~mask) <= radius
    return ndimage.distance_transform_edt(dilated) > radius


def _closing(mask: np.ndarray, radius: float) -> np.ndarray:
    """Closing with a disk of ``radius`` px, on a mask ``k`` times coarser when the radius
    spans more than :data:`CLOSING_GRID_RADIUS` coarse pixels.

    The distance transforms cost ~0.1 s per million pixels whatever the radius, and the fine
    overviews of small slides have a million pixels and radii of 30-130 px. The coarse mask
    marks blocks holding any tissue, so its gaps are up to ``k - 1`` px narrower: the coarse
    radius is shortened by as much. Tissue pixels stay; empty blocks the coarse closing fills
    are filled; a partly filled block is filled only inside the closed region (all its
    neighbours closed), so the tissue's outline keeps its fine detail.
    """
    k = math.floor(radius / CLOSING_GRID_RADIUS)
    if k < 2:
        return _exact_closing(mask, radius)
    height, width = mask.shape
    padded = np.zeros((-(-height // k) * k, -(-width // k) * k), bool)
    padded[:height, :width] = mask
    # ORs of the k² strided sub-grids: NumPy's ``any`` over the k-blocks of a reshape takes
    # ~25x longer.
    coarse = np.logical_or.reduce([padded[i::k, j::k] for i in range(k) for j in range(k)])
    closed = _exact_closing(coarse, (radius - (k - 1)) / k)
    inside = ndimage.binary_erosion(closed, np.ones((3, 3), bool), border_value=1)
    filled = (closed & ~coarse) | inside
    return mask | np.repeat(np.repeat(filled, k, axis=0), k, axis=1)[:height, :width]


def _brightest_darkest(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Elementwise over the three planes: ``rgb.max(axis=-1)`` reduces a length-3 axis per
    # pixel and is ~20x slower.
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)


def _hsv(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees), saturation and value of (n, 3) uint8 pixels, none of them grey, with
    the float64 arithmetic of skimage's ``rgb2hsv`` (ties broken blue over green over red),
    so the values are its, without its masked assignments over the whole picture."""
    r, g, b = (pixels[:, i] * (1.0 / 255) for i in range(3))
    value = np.maximum(np.maximum(r, g), b)
    spread = value - np.minimum(np.minimum(r, g), b)
    hue = np.where(b == value, 4.0 + (r - g) / spread,
                   np.where(g == value, 2.0 + (b - r) / spread, (g - b) / spread))
    return (hue / 6.0) % 1.0 * 360.0, spread / value, value


def pen_ink(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """Boolean mask of blue and green marker-pen ink in an RGB picture at ``mpp`` µm/px."""
    # Every hue in INK_HUES (between 60° and 240°) has green above red, which is cheap to test
    # and leaves most H&E pixels out of the HSV conversion.
    greener = rgb[..., 1] > rgb[..., 0]
    hue, saturation, value = _hsv(rgb[greener])
    ink = np.zeros_like(greener)
    ink[greener] = ((hue >= INK_HUES[0]) & (hue <= INK_HUES[1])
                    & (saturation > INK_MIN_SATURATION) & (value > MIN_VALUE))
    if not ink.any():  # most slides: skip labelling an empty mask
        return ink
    return morphology.remove_small_objects(ink, max_size=max(1, int(INK_MIN_AREA_UM2 / mpp**2)))


def detect_tissue(rgb: np.ndarray, mpp: float, ink: np.ndarray | None = None) -> np.ndarray:
    """Boolean tissue mask of an RGB picture taken at ``mpp`` µm/px, without the pixels of
    ``ink`` (default: :func:`pen_ink` of the picture)."""
    ink = pen_ink(rgb, mpp) if ink is None else ink
    brightest, darkest = (a.astype(np.float32) for a in _brightest_darkest(rgb))
    saturation = np.divide(brightest - darkest, brightest, out=np.zeros_like(brightest),
                           where=brightest > 0)
    value = brightest / 255.0
    stained = saturation[~ink]  # saturated ink would pull Otsu's threshold up
    if stained.size and np.ptp(stained) > 0:
        threshold = float(np.clip(threshold_otsu(stained), MIN_SATURATION,
                                  MAX_SATURATION))
    else:
        threshold = MAX_SATURATION
    mask = (saturation > threshold) & (value > MIN_VALUE) & ~ink
    mask = _closing(mask, CLOSING_RADIUS_UM / mpp)
    min_pixels = max(1, int(MIN_AREA_UM2 / mpp**2))
    mask = morphology.remove_small_objects(mask, max_size=min_pixels)
    # Closing and hole filling would paint tissue back over a stroke drawn across it.
    return morphology.remove_small_holes(mask, max_size=min_pixels) & ~ink


def slide_overview(slide: Slide) -> Overview:
    """Overview picture, tissue mask and pen marks of ``slide``."""
    rgb, downsample = read_overview_rgb(slide, overview_mpp(slide.info))
    mpp = slide.info.mpp * downsample
    ink = pen_ink(rgb, mpp)
    return Overview(rgb=rgb, mask=detect_tissue(rgb, mpp, ink), downsample=downsample, ink=ink)

"""Heatmaps: a slide's patch tumour probabilities drawn where the patches lie on the slide.

Everything comes from the bag (``coords``, level-0 pixels, and each patch's level-0
footprint) and a thumbnail that someone else read (the slide, for ``slidefed predict``;
preprocessing's QC picture, for a finished run), so the engine never opens a slide file.
Patches lie on a grid starting at (0, 0) with the footprint as its step (``wsi.grid``), so
patch i is cell ``coords[i] // footprint`` of a probability raster drawn over the thumbnail,
which is stretched to the slide's level-0 extent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from federation.data.bags import BagFormatError
from formats.atomic import atomic_path
from formats.png import png_bytes

# The figure's long side in inches at DPI: about 1600 px, like the QC pictures.
FIGURE_INCHES, DPI = 8.0, 200
COLOUR_MAP = "inferno"
OUTLINE_COLOUR = "#00e5ff"


@dataclass(frozen=True)
class PatchMap:
    """Where a bag's patches lie on level 0 of its slide."""

    slide_id: str
    coords: np.ndarray  # int64 (N, 2), top-left corners
    footprint: int  # side of each patch in level-0 px
    width: int  # level-0 extent of the slide
    height: int

    def boxes(self) -> np.ndarray:
        """int64 ``(N, 4)`` level-0 ``x0, y0, x1, y1`` of every patch."""
        return np.concatenate([self.coords, self.coords + self.footprint], axis=1)


def read_patch_map(path: str | Path) -> PatchMap:
    """The patch positions of the bag at ``path`` (format version 1 or 2)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            attrs, coords = f.attrs, f["coords"]
            if "patch_size_level0" in coords.attrs:
                footprint = int(coords.attrs["patch_size_level0"])
            else:  # version 1: the footprint follows from the resolutions
                footprint = round(int(f["patches"].attrs["patch_size"])
                                  * float(attrs["target_mpp"]) / float(attrs["mpp_level0"]))
            return PatchMap(str(attrs["slide_id"]), coords[()].astype(np.int64), footprint,
                            int(attrs["level0_width"]), int(attrs["level0_height"]))
    except (OSError, KeyError) as error:
        raise BagFormatError(path, f"cannot read patch positions ({error})") from None


def probability_raster(patches: PatchMap, probabilities: np.ndarray) -> np.ndarray:
    """float64 ``(rows, cols)`` raster of patch probabilities on the patch grid, NaN where no
    patch was kept; cell (r, c) covers level-0 ``[c, c + 1) x [r, r + 1)`` footprints."""
    cells = patches.coords // patches.footprint
    raster = np.full((patches.height // patches.footprint, patches.width // patches.footprint),
                     np.nan)
    raster[cells[:, 1], cells[:, 0]] = probabilities
    return raster


def write_heatmap(path: str | Path, patches: PatchMap, probabilities: np.ndarray,
                  thumbnail: np.ndarray | None, title: str,
                  outlines: Sequence[object] = ()) -> Path:
    """Save a PNG of ``probabilities`` over ``thumbnail`` (RGB, any size: it is stretched to
    the slide's extent; None: a blank slide) with a colour bar, ``title`` and the exteriors
    of the shapely polygons ``outlines`` (level-0 px, e.g. tumour annotations)."""
    figure = heatmap_figure(patches, probabilities, thumbnail, title, outlines)
    figure.set_dpi(DPI)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    pixels = np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])  # opaque figure
    # The QC pictures' fast PNG: savefig's default deflate took 60 % of a heatmap's CPU time.
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(png_bytes(pixels))
    return path


def heatmap_figure(patches: PatchMap, probabilities: np.ndarray, thumbnail: np.ndarray | None,
                   title: str, outlines: Sequence[object] = ()) -> Figure:
    """The figure :func:`write_heatmap` saves: axes 0 holds the slide at its aspect ratio
    (images: thumbnail, then the probability raster), axes 1 the colour bar. A bare
    ``Figure`` (no pyplot) draws with Agg and needs no display."""
    width, height = patches.width, patches.height
    # The slide's axes fill the figure's height below the title; the bar takes a fixed strip.
    title_in, bar_in = 0.5, 1.0
    scale = FIGURE_INCHES / max(width, height)
    slide_w, slide_h = width * scale, height * scale
    fw, fh = slide_w + bar_in, slide_h + title_in
    figure = Figure(figsize=(fw, fh))
    axes = figure.add_axes((0, 0, slide_w / fw, slide_h / fh))
    bar_axes = figure.add_axes(((slide_w + 0.15) / fw, 0.1 * slide_h / fh, 0.15 / fw,
                                0.8 * slide_h / fh))
    extent = (0, width, height, 0)
    if thumbnail is None:
        thumbnail = np.full((1, 1, 3), 235, np.uint8)
    axes.imshow(thumbnail, extent=extent, interpolation="bilinear")
    raster = probability_raster(patches, probabilities)
    rows, cols = raster.shape
    step = patches.footprint
    image = axes.imshow(np.ma.masked_invalid(raster), extent=(0, cols * step, rows * step, 0),
                        cmap=COLOUR_MAP, vmin=0.0, vmax=1.0, alpha=0.6, interpolation="nearest")
    for polygon in outlines:
        for ring in _exteriors(polygon):
            xs, ys = ring.xy
            axes.plot(xs, ys, color=OUTLINE_COLOUR, linewidth=1.2)
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    axes.set_axis_off()
    figure.colorbar(image, cax=bar_axes, label="patch tumour probability")
    figure.suptitle(title, y=1 - 0.12 * title_in / fh, fontsize=9)
    return figure


def _exteriors(geometry: object) -> list:
    parts = getattr(geometry, "geoms", [geometry])
    return [part.exterior for part in parts if hasattr(part, "exterior")]


def heatmap_title(slide_id: str, score: float, prediction: int, threshold: float,
                  model: str) -> str:
    """``<slide>: tumour (score 0.81 >= threshold 0.40, <model>)``."""
    diagnosis, relation = ("tumour", ">=") if prediction else ("no tumour", "<")
    return (f"{slide_id}: {diagnosis} (score {score:.3f} {relation} threshold {threshold:.3f}, "
            f"{model})")

"""Synthetic H&E whole-slide images: pyramidal, tiled, JPEG-compressed generic TIFFs.

Colours follow the Beer–Lambert law with Ruifrok & Johnston's H&E optical-density (OD)
vectors (Ruifrok & Johnston, "Quantification of histochemical staining by color
deconvolution", Analytical and Quantitative Cytology and Histology 23(4), 2001): a pixel is
``background * exp(-(c_H * OD_H + c_E * OD_E))``, the background being the light that passes
through bare glass.

The slide is one continuous description in level-0 pixel coordinates (tissue blobs from
thresholded smooth noise, fibrous eosin stroma, hematoxylin nuclei hashed onto a fixed
level-0 cell grid, optional tumour polygons with denser, larger, darker nuclei, optional
inflamed polygons packed with small dark lymphocytes that mimic tumour). Every pyramid
level is rendered from that description at its own resolution, tile by tile: texture finer than
a level's pixels is faded out rather than aliased, and each nucleus deposits its exact area, so
a low level looks like the block-averaged level 0 without level 0 ever being in memory. Memory
is bounded by a few tiles whatever the slide size.

OpenSlide (4.0.1) opens the files with its generic-TIFF driver and reports
``openslide.mpp-x``/``mpp-y`` from the TIFF XResolution/YResolution tags when ResolutionUnit is
centimetre or inch (not when it is "none"); we write centimetres. JPEG tiles are encoded by
tifffile through imagecodecs as YCbCr with 2x2 chroma subsampling, which OpenSlide decodes back
to the right RGB.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from formats.atomic import atomic_path

log = logging.getLogger(__name__)

RUIFROK_HEMATOXYLIN_OD = (0.650, 0.704, 0.286)
RUIFROK_EOSIN_OD = (0.072, 0.990, 0.105)

# Content is laid out in micrometres; a slide written without resolution tags (mpp=None) is
# drawn as if scanned at this resolution.
NOMINAL_MPP = 0.25

_CELL_UM = 10.0  # nuclei grid: at most one nucleus per 10 µm x 10 µm cell
_FIBRE_PERIOD_UM = 6.0
_TISSUE_GRID = 256  # coarse samples per side used to calibrate the tissue threshold


@dataclass(frozen=True)
class StainProfile:
    """How one hospital's H&E staining and scanner look.

    ``hematoxylin_od``/``eosin_od`` are unit optical-density vectors (R, G, B), the intensities
    scale each stain's concentration, and ``background`` is the RGB of bare glass.
    """

    hematoxylin_od: tuple[float, float, float] = RUIFROK_HEMATOXYLIN_OD
    eosin_od: tuple[float, float, float] = RUIFROK_EOSIN_OD
    hematoxylin_intensity: float = 1.0
    eosin_intensity: float = 1.0
    background: tuple[int, int, int] = (242, 240, 244)

    def __post_init__(self) -> None:
        for name in ("hematoxylin_od", "eosin_od"):
            vector = np.asarray(getattr(self, name), dtype=float)
            if vector.shape != (3,) or (vector <= 0).any():
                raise ValueError(f"StainProfile.{name}={getattr(self, name)} is not 3 positive ODs")
            object.__setattr__(self, name, tuple(float(v) for v in vector / np.linalg.norm(vector)))
        if min(self.hematoxylin_intensity, self.eosin_intensity) <= 0:
            raise ValueError(f"StainProfile intensities must be positive, got {self}")
        if len(self.background) != 3 or not all(0 < c <= 255 for c in self.background):
            raise ValueError(f"StainProfile.background={self.background} is not 3 values in 1..255")


def hospital_stain_profile(index: int) -> StainProfile:
    """Deterministic stain profile of hospital ``index`` (0, 1, 2, ...).

    Hospital 0 uses Ruifrok & Johnston's vectors unchanged. Stain intensities walk the golden-ratio
    sequence so that consecutive hospitals differ clearly; the OD vectors and the glass colour are
    perturbed by a generator seeded with the index.
    """
    if index < 0:
        raise ValueError(f"hospital index must be >= 0, got {index}")
    golden = (math.sqrt(5) - 1) / 2
    hematoxylin_intensity = 0.6 + 0.8 * ((0.5 + index * golden) % 1.0)
    eosin_intensity = 0.6 + 0.8 * ((0.5 + index * golden * golden) % 1.0)
    if index == 0:
        return StainProfile(hematoxylin_intensity=hematoxylin_intensity,
                            eosin_intensity=eosin_intensity)
    rng = np.random.default_rng((0x5EED, index))

    def perturb(vector: tuple[float, float, float]) -> tuple[float, float, float]:
        moved = np.clip(np.asarray(vector) + rng.normal(0.0, 0.12, 3), 0.02, None)
        return tuple(float(v) for v in moved / np.linalg.norm(moved))

    tint = rng.uniform(-6, 6, 3)
    background = tuple(int(round(c)) for c in np.clip(244 - rng.uniform(0, 12) + tint, 200, 255))
    return StainProfile(perturb(RUIFROK_HEMATOXYLIN_OD), perturb(RUIFROK_EOSIN_OD),
                        hematoxylin_intensity, eosin_intensity, background)


@dataclass(frozen=True)
class SyntheticSlideSpec:
    """Everything that determines a synthetic slide's pixels.

    ``mpp`` is level 0's µm per pixel (``None`` writes no resolution tags). Levels shrink by
    ``level_downsample`` until the smallest level's longer side is at most ``smallest_level_px``.
    The share of the slide covered by tissue is drawn from the range ``tissue_fraction``.

    Tumour: ``tumour_regions`` large regions share 40-55 % of the tissue; ``tumour_foci`` small
    ones are 36-72 µm in radius (one to four 64-µm patches). ``tumour_contrast`` is the
    difficulty knob: at 1 tumour nuclei are as dense, large, dark and irregular as they get
    here (and tumour cytoplasm as pale-purple); at 0 tumour cells look like normal stroma
    (only their nuclei's random orientation is left); in between every one of those
    properties is the linear blend. ``inflamed_regions`` are normal tissue that mimics
    tumour at low power: 40-120 µm patches crowded with small dark lymphocytes, never
    annotated as tumour. The defaults draw neither foci nor mimics, at full contrast.
    """

    width: int
    height: int
    mpp: float | None = 0.25
    tile_size: int = 256
    tumour_regions: int = 0
    stain: StainProfile = field(default_factory=StainProfile)
    seed: int = 0
    jpeg_quality: int = 85
    level_downsample: int = 4
    smallest_level_px: int = 2048
    tumour_foci: int = 0
    tumour_contrast: float = 1.0
    inflamed_regions: int = 0
    tissue_fraction: tuple[float, float] = (0.4, 0.6)

    def __post_init__(self) -> None:
        # A list from YAML or JSON becomes the tuple the spec's JSON and equality expect.
        object.__setattr__(self, "tissue_fraction", tuple(float(v) for v in self.tissue_fraction))
        checks = {
            "width": self.width >= 1,
            "height": self.height >= 1,
            "mpp": self.mpp is None or self.mpp > 0,
            "tile_size": self.tile_size >= 16 and self.tile_size % 16 == 0,
            "tumour_regions": self.tumour_regions >= 0,
            "seed": self.seed >= 0,
            "jpeg_quality": 1 <= self.jpeg_quality <= 100,
            "level_downsample": self.level_downsample >= 2,
            "smallest_level_px": self.smallest_level_px >= 1,
            "tumour_foci": self.tumour_foci >= 0,
            "tumour_contrast": 0.0 <= self.tumour_contrast <= 1.0,
            "inflamed_regions": self.inflamed_regions >= 0,
            "tissue_fraction": len(self.tissue_fraction) == 2
            and 0.0 < self.tissue_fraction[0] <= self.tissue_fraction[1] < 1.0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"SyntheticSlideSpec.{name}={getattr(self, name)!r} is invalid")

    @property
    def level_downsamples(self) -> list[int]:
        """Nominal downsample of each pyramid level (1, d, d², ...)."""
        downsamples = [1]
        while max(self.width, self.height) / downsamples[-1] > self.smallest_level_px:
            downsamples.append(downsamples[-1] * self.level_downsample)
        return downsamples

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        """(width, height) of each level: level-0 size divided by its downsample, rounded up."""
        return [(math.ceil(self.width / d), math.ceil(self.height / d))
                for d in self.level_downsamples]


@dataclass
class SyntheticSlide:
    """A synthetic slide on disk and its ground truth."""

    path: Path
    spec: SyntheticSlideSpec
    tumour_polygons: list[np.ndarray]  # each (M, 2) float, level-0 (x, y), not closed

    @classmethod
    def from_spec(cls, path: Path, spec: SyntheticSlideSpec) -> SyntheticSlide:
        """Ground truth of the slide ``spec`` describes, without rendering or touching ``path``."""
        return cls(Path(path), spec, _SlideModel(spec).tumour_polygons)

    def tumour_mask(self, downsample: float) -> np.ndarray:
        """Boolean (ceil(H/ds), ceil(W/ds)) mask: pixels whose centre lies in a tumour polygon."""
        if downsample <= 0:
            raise ValueError(f"downsample must be positive, got {downsample}")
        xs = (np.arange(math.ceil(self.spec.width / downsample)) + 0.5) * downsample
        ys = (np.arange(math.ceil(self.spec.height / downsample)) + 0.5) * downsample
        return _rasterize_polygons(self.tumour_polygons, xs, ys)


def write_synthetic_slide(path: Path | str, spec: SyntheticSlideSpec) -> SyntheticSlide:
    """Render ``spec`` into a pyramidal tiled JPEG TIFF at ``path``, tile by tile.

    The file is written under a temporary name in the same directory and renamed, so ``path``
    either holds a whole slide or nothing. The spec is kept, as JSON, in the ImageDescription.
    """
    path = Path(path)
    model = _SlideModel(spec)
    started = time.perf_counter()
    with atomic_path(path) as partial, tifffile.TiffWriter(partial, bigtiff=True) as writer:
        for level, (width, height) in enumerate(spec.level_dimensions):
            writer.write(
                model.tiles(level),
                shape=(height, width, 3),
                dtype=np.uint8,
                tile=(spec.tile_size, spec.tile_size),
                photometric="rgb",  # tifffile stores JPEG as YCbCr 4:2:0, tagged as such
                compression="jpeg",
                compressionargs={"level": spec.jpeg_quality},
                subfiletype=1 if level else 0,
                description=_spec_json(spec) if level == 0 else None,
                metadata=None,
                maxworkers=1,
                **_resolution_tags(spec.mpp, spec.level_downsamples[level]),
            )
    seconds = time.perf_counter() - started
    log.info("wrote %s (%dx%d, %d levels) in %.1f s, %.1f Mpx/s of level 0", path, spec.width,
             spec.height, len(spec.level_downsamples), seconds,
             spec.width * spec.height / 1e6 / max(seconds, 1e-9))
    return SyntheticSlide(path, spec, model.tumour_polygons)


def written_with(path: Path | str, spec: SyntheticSlideSpec) -> bool:
    """Whether ``path`` is a slide that :func:`write_synthetic_slide` wrote from ``spec``."""
    try:
        with tifffile.TiffFile(path) as tiff:
            description = tiff.pages.first.description
    except (OSError, tifffile.TiffFileError):
        return False
    return description == _spec_json(spec)


def tumour_geojson(polygons: list[np.ndarray]) -> dict:
    """GeoJSON FeatureCollection, one QuPath-style "Tumor" annotation per polygon (level-0 px)."""
    features = []
    for polygon in polygons:
        ring = np.round(np.asarray(polygon, dtype=float), 2).tolist()
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring + ring[:1]]},
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
        })
    return {"type": "FeatureCollection", "features": features}


def _spec_json(spec: SyntheticSlideSpec) -> str:
    return json.dumps({"generator": "slidefed.wsi.synthetic", "spec": asdict(spec)},
                      sort_keys=True)


def _resolution_tags(mpp: float | None, downsample: int) -> dict:
    if mpp is None:
        return {}
    pixels_per_cm = 1e4 / (mpp * downsample)
    return {"resolution": (pixels_per_cm, pixels_per_cm), "resolutionunit": "CENTIMETER"}


# --- deterministic randomness -------------------------------------------------------------------

_MASK64 = (1 << 64) - 1
_GOLDEN64 = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele, Lea & Flood, OOPSLA 2014): a bijective 64-bit hash."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _key(seed: int, stream: int) -> np.uint64:
    return np.uint64((seed * 0x100000001B3 + stream * 0xD6E8FEB86659FD93 + 1) & _MASK64)


def _hash_uniform(seed: int, stream: int, ix: np.ndarray, iy: np.ndarray, draws: int) -> np.ndarray:
    """``draws`` uniforms in [0, 1) per lattice point (ix, iy broadcast together): (draws, ...)."""
    key = _mix(_mix(ix.astype(np.int64).astype(np.uint64) ^ _key(seed, stream))
               + iy.astype(np.int64).astype(np.uint64) * _GOLDEN64)
    out = np.empty((draws, *key.shape), dtype=np.float32)
    for k in range(draws):
        bits = _mix(key + np.uint64((k + 1) * int(_GOLDEN64) & _MASK64)) >> np.uint64(40)
        out[k] = bits.astype(np.float32) * np.float32(2.0**-24)
    return out


def _lattice_position(coords: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Lattice cell of each coordinate (from the first one), smoothstep weight, first cell."""
    u = coords / scale
    cell = np.floor(u)
    t = u - cell
    first = int(cell[0])
    return (cell - first).astype(np.intp), (t * t * (3.0 - 2.0 * t)).astype(np.float32), first


def _value_noise(seed: int, stream: int, xs: np.ndarray, ys: np.ndarray,
                 scale: float) -> np.ndarray:
    """Smooth lattice value noise in [-1, 1] on the grid ``ys`` x ``xs`` (sorted, level-0 px).

    Interpolation is separable: along x on the few lattice rows first, then along y, so the
    per-pixel work is two gathers and a blend. (Not a matrix product: a multi-threaded BLAS on
    tiny matrices is slower than this on a busy machine.)
    """
    col, wx, x0 = _lattice_position(xs, scale)
    row, wy, y0 = _lattice_position(ys, scale)
    ix = np.arange(x0, x0 + col[-1] + 2)[None, :]
    iy = np.arange(y0, y0 + row[-1] + 2)[:, None]
    lattice = 2.0 * _hash_uniform(seed, stream, ix, iy, 1)[0] - 1.0
    along_x = lattice[:, col] + (lattice[:, col + 1] - lattice[:, col]) * wx
    top = along_x[row]
    return top + (along_x[row + 1] - top) * wy[:, None]


def _detail_gain(period: float, downsample: float) -> float:
    """Amplitude kept of a pattern with this level-0 period at this downsample.

    A smooth low-pass that fades detail out as it approaches two pixels (the Nyquist limit), so
    low levels show its average instead of aliasing it.
    """
    return math.exp(-((2.0 * downsample / period) ** 2))


# --- geometry -----------------------------------------------------------------------------------


def _rasterize_polygons(polygons: list[np.ndarray], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Even-odd fill of polygons sampled at grid points (sorted ``xs``, ``ys``): (len(ys), len(xs)).

    Scanline fill: each edge's crossing of each row marks where the inside/outside parity
    flips; a cumulative sum along the row turns the marks into parity.
    """
    mask = np.zeros((ys.size, xs.size), dtype=bool)
    for polygon in polygons:
        x1, y1 = polygon[:, 0], polygon[:, 1]
        x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
        if ys.size == 0 or xs.size == 0 or y1.max() < ys[0] or y1.min() > ys[-1]:
            continue
        y = ys[:, None]
        crosses = (y1 <= y) != (y2 <= y)
        row, edge = np.nonzero(crosses)
        x_cross = x1[edge] + (ys[row] - y1[edge]) * (x2[edge] - x1[edge]) / (y2[edge] - y1[edge])
        first_right = np.searchsorted(xs, x_cross, side="right")
        flips = np.bincount(row * (xs.size + 1) + first_right, minlength=ys.size * (xs.size + 1))
        parity = np.cumsum(flips.reshape(ys.size, xs.size + 1)[:, :-1], axis=1) & 1
        mask |= parity.astype(bool)
    return mask


@dataclass(frozen=True)
class _NucleusKind:
    """Distribution of one kind of nucleus (lengths in µm, OD as hematoxylin concentration)."""

    radius: float
    radius_spread: float
    aspect: float
    aspect_spread: float
    od: float
    od_spread: float
    irregularity: float
    irregularity_spread: float
    follows_fibres: bool


_STROMAL = _NucleusKind(2.8, 0.35, 1.3, 1.0, 1.15, 0.35, 0.02, 0.04, True)
_LYMPHOCYTE = _NucleusKind(2.2, 0.2, 1.0, 0.15, 1.6, 0.3, 0.0, 0.03, False)
_TUMOUR = _NucleusKind(4.0, 0.35, 1.0, 0.6, 1.75, 0.5, 0.05, 0.12, False)
_LYMPHOCYTE_SHARE = 0.3
_TUMOUR_CELL_PROBABILITY = 0.88
_TUMOUR_EOSIN, _TUMOUR_CYTOPLASM = 0.8, 2.3  # tumour stroma: less eosin, more (purple) cytoplasm
_INFLAMED_CELL_PROBABILITY = 0.85
_FOCUS_RADIUS_UM = (36.0, 72.0)  # area of one to four 64-µm patches
_INFLAMED_RADIUS_UM = (40.0, 120.0)
_REGION_CENTRE_TRIES = 6


def _lerp(a: float, b: float, t: float) -> float:
    """a at t = 0, b at t = 1; exactly b at t = 1, so full contrast reproduces older slides."""
    return a * (1.0 - t) + b * t


def _tumour_kind(contrast: float) -> _NucleusKind:
    """Tumour nuclei at ``contrast``: stromal ones at 0, :data:`_TUMOUR` at 1."""
    blended = {f.name: _lerp(getattr(_STROMAL, f.name), getattr(_TUMOUR, f.name), contrast)
               for f in fields(_NucleusKind) if f.name != "follows_fibres"}
    return _NucleusKind(**blended, follows_fibres=_TUMOUR.follows_fibres)


@dataclass(frozen=True)
class _NearbyRegions:
    """The tumour and inflamed polygons that can touch one tile's pixels."""

    tumour: list[np.ndarray]
    inflamed: list[np.ndarray]


class _SlideModel:
    """The continuous description of one slide; renders any tile of any level."""

    def __init__(self, spec: SyntheticSlideSpec) -> None:
        self.spec = spec
        self.px_per_um = 1.0 / (spec.mpp or NOMINAL_MPP)
        self.cell = _CELL_UM * self.px_per_um
        contrast = spec.tumour_contrast
        self.tumour_kind = _tumour_kind(contrast)
        self.tumour_cell_probability = _lerp(0.0, _TUMOUR_CELL_PROBABILITY, contrast)
        self.tumour_eosin = _lerp(1.0, _TUMOUR_EOSIN, contrast)
        self.tumour_cytoplasm = _lerp(1.0, _TUMOUR_CYTOPLASM, contrast)
        # Farthest a nucleus reaches from its centre, in level-0 px.
        self.nucleus_extent = self.px_per_um * max(
            kind.radius * (1 + kind.radius_spread) * math.sqrt(kind.aspect + kind.aspect_spread)
            * (1 + kind.irregularity + kind.irregularity_spread)
            for kind in (_STROMAL, _LYMPHOCYTE, self.tumour_kind))
        stain = spec.stain
        # Optical density per unit concentration, per colour channel.
        self.hematoxylin = np.float32(stain.hematoxylin_intensity) * np.asarray(
            stain.hematoxylin_od, np.float32)
        self.eosin = np.float32(stain.eosin_intensity) * np.asarray(stain.eosin_od, np.float32)
        self.background = np.asarray(stain.background, np.float32)

        rng = np.random.default_rng((spec.seed, 0x7155E))
        extent = min(spec.width, spec.height)
        blobs = int(rng.integers(2, 5))
        self.blob_x = rng.uniform(0.25, 0.75, blobs) * spec.width
        self.blob_y = rng.uniform(0.25, 0.75, blobs) * spec.height
        self.blob_sx = rng.uniform(0.08, 0.18, blobs) * extent
        self.blob_sy = rng.uniform(0.08, 0.18, blobs) * extent
        self.blob_weight = rng.uniform(0.7, 1.0, blobs).astype(np.float32)
        self.tissue_scales = (extent / 3.0, extent / 9.0, 60.0 * self.px_per_um)
        self.fibre_angle = float(rng.uniform(0.0, math.pi))
        tissue_fraction = float(rng.uniform(*spec.tissue_fraction))

        step_x, step_y = spec.width / _TISSUE_GRID, spec.height / _TISSUE_GRID
        grid_x = (np.arange(_TISSUE_GRID) + 0.5) * step_x
        grid_y = (np.arange(_TISSUE_GRID) + 0.5) * step_y
        field_grid = self._tissue_field(grid_x, grid_y, max(step_x, step_y))
        self.threshold = float(np.quantile(field_grid, 1.0 - tissue_fraction))
        # Soft tissue edge one output pixel wide: field units per level-0 px at the boundary.
        gy, gx = np.gradient(field_grid, step_y, step_x)
        boundary = np.abs(field_grid - self.threshold) < 0.05 * field_grid.std()
        slope = np.hypot(gx, gy)[boundary] if boundary.any() else np.hypot(gx, gy).ravel()
        self.edge_slope = float(np.median(slope)) + 1e-12
        self.tumour_polygons, self.inflamed_polygons = self._regions(
            rng, field_grid > self.threshold, grid_x, grid_y)

    # -- tissue layout ---------------------------------------------------------------------------

    def _tissue_field(self, xs: np.ndarray, ys: np.ndarray, downsample: float) -> np.ndarray:
        # Gaussian blobs are separable: each is the outer product of two 1-D profiles.
        gauss_x = np.exp(-0.5 * ((xs[None, :] - self.blob_x[:, None]) / self.blob_sx[:, None]) ** 2)
        gauss_y = np.exp(-0.5 * ((ys[None, :] - self.blob_y[:, None]) / self.blob_sy[:, None]) ** 2)
        gauss_y *= self.blob_weight[:, None]
        field_ = np.zeros((ys.size, xs.size), dtype=np.float32)
        for profile_y, profile_x in zip(gauss_y.astype(np.float32), gauss_x.astype(np.float32),
                                        strict=True):
            field_ += np.multiply.outer(profile_y, profile_x)
        for octave, (scale, amplitude) in enumerate(zip(self.tissue_scales, (0.45, 0.2, 0.06),
                                                        strict=True)):
            gain = _detail_gain(2.0 * scale, downsample) if octave == 2 else 1.0
            if gain > 1e-3:
                field_ += amplitude * gain * _value_noise(self.spec.seed, octave, xs, ys, scale)
        # Keep tissue off the slide's edges, as on a real glass slide.
        field_ -= (_edge_penalty(ys, self.spec.height)[:, None]
                   + _edge_penalty(xs, self.spec.width)[None, :])
        return field_

    def _tissue_coverage(self, xs: np.ndarray, ys: np.ndarray, downsample: float) -> np.ndarray:
        field_ = self._tissue_field(xs, ys, downsample)
        return np.clip(0.5 + (field_ - self.threshold) / (self.edge_slope * downsample), 0.0, 1.0)

    def _gaps(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Fraction of lumen / fat-like white space inside tissue (0..1)."""
        noise = _value_noise(self.spec.seed, 10, xs, ys, 50.0 * self.px_per_um)
        return np.clip((noise - 0.3) / 0.15, 0.0, 1.0)

    def _cellularity(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Probability that a normal-tissue cell holds a nucleus."""
        noise = _value_noise(self.spec.seed, 11, xs, ys, 150.0 * self.px_per_um)
        return 0.2 + 0.22 * noise

    def _regions(self, rng: np.random.Generator, tissue: np.ndarray, grid_x: np.ndarray,
                 grid_y: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Tumour polygons (large regions, then foci) and inflamed polygons, deep in tissue.

        Star-shaped, each kept inside the tissue outline and away from the ones placed before.
        Each region tries a few centres, drawn with weight depth² (depth: distance to glass), and
        keeps the largest polygon, so that a region is rarely squeezed by a narrow strip of tissue.
        """
        spec = self.spec
        regions = spec.tumour_regions
        kinds = (["region"] * regions + ["focus"] * spec.tumour_foci
                 + ["inflamed"] * spec.inflamed_regions)
        if not kinds:
            return [], []
        depth = ndimage.distance_transform_edt(tissue, sampling=(grid_y[1] - grid_y[0],
                                                                 grid_x[1] - grid_x[0]))
        tissue_area = tissue.mean() * spec.width * spec.height
        placed: dict[str, list[np.ndarray]] = {"region": [], "focus": [], "inflamed": []}
        for kind in kinds:
            if depth.max() <= 0:
                break
            if kind == "region":
                target = math.sqrt(tissue_area * rng.uniform(0.4, 0.55) / regions / math.pi)
            else:
                radius_um = _FOCUS_RADIUS_UM if kind == "focus" else _INFLAMED_RADIUS_UM
                target = rng.uniform(*radius_um) * self.px_per_um
            weights = (depth**2).ravel()
            centres = rng.choice(depth.size, size=_REGION_CENTRE_TRIES, p=weights / weights.sum())
            candidates = [self._star_polygon(rng, tissue, grid_x, grid_y,
                                             np.array([grid_x[c % depth.shape[1]],
                                                       grid_y[c // depth.shape[1]]]), target)
                          for c in centres]
            polygon = max(candidates, key=_polygon_area)
            placed[kind].append(polygon)
            centre = polygon.mean(axis=0)
            taken = np.hypot(grid_x[None, :] - centre[0], grid_y[:, None] - centre[1])
            depth = np.where(taken < 2.0 * target, 0.0, depth)
        return placed["region"] + placed["focus"], placed["inflamed"]

    def _star_polygon(self, rng: np.random.Generator, tissue: np.ndarray, grid_x: np.ndarray,
                      grid_y: np.ndarray, centre: np.ndarray, target: float) -> np.ndarray:
        """Polygon of radius ``target`` wobbled by low harmonics, cut back to stay in tissue."""
        angles = np.linspace(0.0, 2.0 * math.pi, 64, endpoint=False)
        harmonics = np.arange(2, 6)
        amplitudes = rng.uniform(0.0, 0.22, harmonics.size) / harmonics**0.5
        phases = rng.uniform(0.0, 2.0 * math.pi, harmonics.size)
        radius = target * (1.0 + (amplitudes * np.cos(np.outer(angles, harmonics) + phases)).sum(1))
        # Walk each ray over the coarse tissue grid; stop short of the first glass sample.
        rays = np.linspace(0.0, 1.0, 96)
        reach = 2.0 * radius.max()
        px = centre[0] + np.outer(np.cos(angles), rays) * reach
        py = centre[1] + np.outer(np.sin(angles), rays) * reach
        step_x, step_y = grid_x[1] - grid_x[0], grid_y[1] - grid_y[0]
        cols = np.clip((px / step_x).astype(int), 0, tissue.shape[1] - 1)
        rows = np.clip((py / step_y).astype(int), 0, tissue.shape[0] - 1)
        outside = (~tissue[rows, cols] | (px < 0) | (py < 0) | (px >= self.spec.width)
                   | (py >= self.spec.height))
        first_out = np.where(outside.any(axis=1), outside.argmax(axis=1), rays.size)
        radius = np.minimum(radius, 0.9 * reach * rays[np.maximum(first_out - 1, 0)])
        return centre + radius[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)

    # -- nuclei ----------------------------------------------------------------------------------

    def _nuclei(self, xs: np.ndarray, ys: np.ndarray, downsample: float,
                near: _NearbyRegions) -> tuple[np.ndarray, np.ndarray]:
        """Nuclear coverage (above 1 where nuclei overlap) and mean nuclear OD of each pixel.

        Cell (i, j) of the fixed level-0 grid holds at most one nucleus, whose presence, position,
        shape and darkness come from hashing (seed, i, j), so every tile that overlaps a nucleus
        draws the same one. Each nucleus deposits exactly its area, whatever the pixel size.
        """
        cell = self.cell
        margin = self.nucleus_extent + 3.0 * downsample
        cx = np.arange(math.floor((xs[0] - margin) / cell),
                       math.floor((xs[-1] + margin) / cell) + 1)
        cy_all = np.arange(math.floor((ys[0] - margin) / cell),
                           math.floor((ys[-1] + margin) / cell) + 1)
        coverage = np.zeros(ys.size * xs.size)
        weighted_od = np.zeros_like(coverage)
        rows_per_chunk = max(1, 16384 // cx.size)  # bounds memory on low levels of huge slides
        for start in range(0, cy_all.size, rows_per_chunk):
            params = self._nucleus_parameters(cx, cy_all[start:start + rows_per_chunk], near)
            if params is None:
                continue
            col = (params["x"] - xs[0]) / downsample
            row = (params["y"] - ys[0]) / downsample
            half = _footprint_half(params["a"] * (1.0 + params["irregularity"]) / downsample)
            meets = ((np.floor(col) + half >= 0) & (np.floor(col) - half < xs.size)
                     & (np.floor(row) + half >= 0) & (np.floor(row) - half < ys.size))
            pieces = []
            for size in np.unique(half[meets]):
                chosen = np.flatnonzero(meets & (half == size))
                nucleus, flat, weight = _footprints({k: v[chosen] for k, v in params.items()},
                                                    col[chosen], row[chosen], int(size),
                                                    downsample, xs.size, ys.size)
                pieces.append((flat, weight, params["od"][chosen][nucleus]))
            if pieces:
                flat, weight, od = (np.concatenate(parts) for parts in zip(*pieces, strict=True))
                coverage += np.bincount(flat, weight, minlength=coverage.size)
                weighted_od += np.bincount(flat, weight * od, minlength=coverage.size)
        mean_od = weighted_od / np.maximum(coverage, 1e-6)
        shape = (ys.size, xs.size)
        return coverage.astype(np.float32).reshape(shape), mean_od.astype(np.float32).reshape(shape)

    def _nucleus_parameters(self, cx: np.ndarray, cy: np.ndarray,
                            near: _NearbyRegions) -> dict[str, np.ndarray] | None:
        cell = self.cell
        centres_x, centres_y = (cx + 0.5) * cell, (cy + 0.5) * cell
        in_tissue = self._tissue_coverage(centres_x, centres_y, cell) >= 0.5
        if not in_tissue.any():
            return None
        probability = self._cellularity(centres_x, centres_y)
        tumour = _rasterize_polygons(near.tumour, centres_x, centres_y)
        inflamed = _rasterize_polygons(near.inflamed, centres_x, centres_y) & ~tumour
        # Below full contrast tumour cellularity leans towards the normal tissue around it.
        probability = np.where(tumour, probability * (1.0 - self.spec.tumour_contrast)
                               + self.tumour_cell_probability, probability)
        probability = np.where(inflamed, _INFLAMED_CELL_PROBABILITY, probability)
        probability *= 1.0 - self._gaps(centres_x, centres_y)
        iy, ix = np.broadcast_arrays(cy[:, None], cx[None, :])
        draws = _hash_uniform(self.spec.seed, 20, ix, iy, 9)
        present = in_tissue & (draws[0] < probability)
        if not present.any():
            return None
        u = draws[:, present]
        tumour = tumour[present]
        lymphocyte = ~tumour & (inflamed[present] | (u[1] < _LYMPHOCYTE_SHARE))
        kinds = (self.tumour_kind, _LYMPHOCYTE, _STROMAL)
        choose = [tumour, lymphocyte, ~tumour & ~lymphocyte]

        def pick(attribute: str) -> np.ndarray:
            values = [getattr(kind, attribute) for kind in kinds]
            return np.select(choose, values).astype(np.float32)

        radius = pick("radius") * (1.0 + pick("radius_spread") * (2.0 * u[4] - 1.0))
        aspect = pick("aspect") + pick("aspect_spread") * u[5]
        random_angle = u[6] * math.pi
        fibre_angle = self.fibre_angle + (u[6] - 0.5) * 0.8
        return {
            "x": (ix[present] + 0.15 + 0.7 * u[2]) * cell,
            "y": (iy[present] + 0.15 + 0.7 * u[3]) * cell,
            "a": radius * np.sqrt(aspect) * self.px_per_um,
            "b": radius / np.sqrt(aspect) * self.px_per_um,
            "angle": np.where(pick("follows_fibres") > 0, fibre_angle, random_angle),
            "od": pick("od") + pick("od_spread") * u[7],
            "irregularity": pick("irregularity") + pick("irregularity_spread") * u[8],
            "phase": u[1] * 2.0 * math.pi,
        }

    # -- rendering -------------------------------------------------------------------------------

    def tiles(self, level: int) -> Iterator[np.ndarray]:
        """Tiles of ``level`` in row-major order, as tifffile expects them."""
        width, height = self.spec.level_dimensions[level]
        size = self.spec.tile_size
        for ty in range(math.ceil(height / size)):
            for tx in range(math.ceil(width / size)):
                yield self.render_tile(level, tx, ty)

    def render_tile(self, level: int, tx: int, ty: int) -> np.ndarray:
        """RGB uint8 (tile, tile, 3) of tile (tx, ty) of ``level``, drawn at that level's scale."""
        size, downsample = self.spec.tile_size, self.spec.level_downsamples[level]
        xs = (tx * size + np.arange(size) + 0.5) * downsample
        ys = (ty * size + np.arange(size) + 0.5) * downsample
        rng = np.random.default_rng((self.spec.seed, level, tx, ty))
        # Zero-mean uniform noise of unit variance; averaging d² level-0 pixels divides it by d.
        noise = (rng.random((3, size, size), np.float32) - np.float32(0.5)) * np.float32(
            math.sqrt(12.0) / downsample)
        glass_noise = 1.5 * noise[0]
        coverage = self._tissue_coverage(xs, ys, downsample)
        if not coverage.any():
            return _interleave([glass_noise + value for value in self.background])

        reach = self.nucleus_extent + 3.0 * downsample
        near = _NearbyRegions(
            *([p for p in polygons if _boxes_overlap(p, xs, ys, reach)]
              for polygons in (self.tumour_polygons, self.inflamed_polygons)))
        stroma = coverage * (1.0 - 0.88 * self._gaps(xs, ys))
        eosin = stroma * self._stroma_texture(xs, ys, downsample) * (1.0 + 0.06 * noise[1])
        cytoplasm = stroma * np.float32(0.07)
        if near.tumour:
            tumour = _rasterize_polygons(near.tumour, xs, ys)
            eosin[tumour] *= self.tumour_eosin
            cytoplasm[tumour] *= self.tumour_cytoplasm
        nuclear, nuclear_od = self._nuclei(xs, ys, downsample, near)
        nuclear = np.minimum(nuclear * (1.0 + 0.1 * noise[2]), 1.0) * coverage
        # Colour planes one at a time: numpy is slow on a trailing axis of length 3.
        planes = []
        for channel in range(3):
            transmission = np.exp(-(cytoplasm * self.hematoxylin[channel]
                                    + eosin * self.eosin[channel]))
            # Light mixes linearly inside a pixel: a fraction φ of it crossed a nucleus.
            nucleus = np.exp(-self.hematoxylin[channel] * nuclear_od)
            transmission *= 1.0 - nuclear * (1.0 - nucleus)
            planes.append((glass_noise + self.background[channel]) * transmission)
        return _interleave(planes)

    def _stroma_texture(self, xs: np.ndarray, ys: np.ndarray, downsample: float) -> np.ndarray:
        """Eosin concentration of stroma: wavy collagen fibres over smooth density changes."""
        seed, um = self.spec.seed, self.px_per_um
        texture = 0.5 + 0.1 * _value_noise(seed, 12, xs, ys, 120.0 * um)
        gain = _detail_gain(2.0 * 25.0 * um, downsample)
        if gain > 1e-3:
            texture += 0.1 * gain * _value_noise(seed, 13, xs, ys, 25.0 * um)
        period = _FIBRE_PERIOD_UM * um
        gain = _detail_gain(period, downsample)
        if gain > 1e-3:
            along = 2.0 * math.pi / period
            # Phase of the straight fibres, reduced mod 2π in float64 before going to float32.
            phase_x = np.mod(along * math.cos(self.fibre_angle) * xs, 2.0 * math.pi)
            phase_y = np.mod(along * math.sin(self.fibre_angle) * ys, 2.0 * math.pi)
            phase = (phase_y.astype(np.float32)[:, None] + phase_x.astype(np.float32)
                     + 40.0 * _value_noise(seed, 14, xs, ys, 90.0 * um))
            visibility = 0.5 + 0.5 * _value_noise(seed, 15, xs, ys, 70.0 * um)
            texture += (0.2 * gain) * visibility * np.sin(phase)
        return texture


def _footprint_half(reach_px: np.ndarray | float) -> np.ndarray:
    """Half-width in pixels of the box drawn around a nucleus reaching ``reach_px`` pixels.

    Rounded up to even so that nuclei of similar size share one box shape.
    """
    needed = np.ceil(np.asarray(reach_px) + 2.0)
    return (2 * np.ceil(needed / 2)).astype(int)


def _footprints(params: dict[str, np.ndarray], col: np.ndarray, row: np.ndarray, half: int,
                downsample: float, width: int,
                height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nucleus, flat pixel index, coverage) of every tile pixel that a nucleus covers.

    Coverage is computed over a (2*half+1)² box around each nucleus, whole, even where the box
    leaves the tile, so that the area normalisation is the same in every tile.

    ``col``/``row`` are the nucleus centres in (fractional) tile pixel coordinates. The
    boundary is an ellipse whose radius varies as 1 + eps*cos(3θ + φ) (lobed, irregular
    nuclei); cos/sin 3θ come from polynomials in (u, v), not arctan2. Edges ramp over 1.5 px and
    each footprint is rescaled to the nucleus' exact area in pixels.
    """
    a_px = params["a"] / downsample
    b_px = params["b"] / downsample
    eps = params["irregularity"]
    offsets = np.arange(-half, half + 1, dtype=np.float32)
    cols = np.floor(col).astype(np.float32)[:, None] + offsets  # (n, B)
    rows = np.floor(row).astype(np.float32)[:, None] + offsets
    dx = (cols - col[:, None].astype(np.float32))[:, None, :]  # (n, 1, B)
    dy = (rows - row[:, None].astype(np.float32))[:, :, None]  # (n, B, 1)
    cos = np.cos(params["angle"]).astype(np.float32)
    sin = np.sin(params["angle"]).astype(np.float32)
    u = dx * (cos / a_px)[:, None, None] + dy * (sin / a_px)[:, None, None]
    v = dy * (cos / b_px)[:, None, None] - dx * (sin / b_px)[:, None, None]
    uu, vv = u * u, v * v
    rho_sq = uu + vv
    rho = np.sqrt(rho_sq)
    lobes = (np.cos(params["phase"]) * eps).astype(np.float32)[:, None, None] * u * (uu - 3 * vv)
    lobes -= (np.sin(params["phase"]) * eps).astype(np.float32)[:, None, None] * v * (3 * uu - vv)
    lobes /= rho * rho_sq + np.float32(1e-6)
    radius_px = np.sqrt(a_px * b_px)[:, None, None]
    footprint = np.clip(0.5 - (rho - 1.0 - lobes) * (radius_px / 1.5), 0.0, 1.0)
    area = (math.pi * a_px * b_px * (1.0 + 0.5 * eps * eps))[:, None, None]
    footprint *= area / np.maximum(footprint.sum(axis=(1, 2), keepdims=True), 1e-6)
    nucleus, i, j = np.nonzero(footprint)
    weight = footprint[nucleus, i, j]
    pixel_row = rows.astype(np.intp)[nucleus, i]
    pixel_col = cols.astype(np.intp)[nucleus, j]
    inside = (pixel_row >= 0) & (pixel_row < height) & (pixel_col >= 0) & (pixel_col < width)
    return nucleus[inside], pixel_row[inside] * width + pixel_col[inside], weight[inside]


def _edge_penalty(coords: np.ndarray, length: int) -> np.ndarray:
    """0 in the middle of the slide, rising steeply within 6 % of ``length`` of an edge."""
    margin = 0.06 * length
    near = np.clip(1.0 - np.minimum(coords, length - coords) / margin, 0.0, 1.0)
    return (3.0 * near * near).astype(np.float32)


def _polygon_area(polygon: np.ndarray) -> float:
    """Shoelace formula."""
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _boxes_overlap(polygon: np.ndarray, xs: np.ndarray, ys: np.ndarray, grow: float) -> bool:
    """Whether a polygon's bounding box, grown by ``grow`` level-0 px, meets the grid's."""
    return bool(polygon[:, 0].min() <= xs[-1] + grow and polygon[:, 0].max() >= xs[0] - grow
                and polygon[:, 1].min() <= ys[-1] + grow and polygon[:, 1].max() >= ys[0] - grow)


def _interleave(planes: list[np.ndarray]) -> np.ndarray:
    """Stack float R, G, B planes into one rounded (H, W, 3) uint8 image."""
    rgb = np.empty((*planes[0].shape, 3), dtype=np.uint8)
    for channel, plane in enumerate(planes):
        plane += 0.5
        rgb[..., channel] = np.clip(plane, 0, 255, out=plane)
    return rgb

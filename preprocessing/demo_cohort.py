"""A synthetic multi-hospital cohort: slides, slide labels and tumour annotations.

Layout, one directory per hospital (``hospital_a``, ``hospital_b``, ...)::

    <out>/<hospital>/slides/<slide_id>.tiff          synthetic H&E slide (wsi.synthetic)
    <out>/<hospital>/labels.csv                      slide_id,path,label,annotation
    <out>/<hospital>/annotations/<slide_id>.geojson  tumour polygons, level-0 px

``path`` and ``annotation`` in labels.csv are relative to the CSV's own directory, so a cohort
can be moved or copied as a whole. ``label`` is 1 for a slide with tumour and 0 for a normal
one. Normal slides have an empty FeatureCollection: annotated, no tumour, so their patches are
labelled 0 from the annotation.

Hospitals differ the way real ones do (:func:`hospital_profile`): stain, scanner (hospital b
scans at 20×, 0.5 µm/px, the others at 40×, 0.25 µm/px, over the same tissue size), tumour
prevalence and cohort size (hospital c is small). A quarter of the tumour slides hold only
small foci, and every slide may carry inflamed regions that mimic tumour, so a slide-level
classifier has hard cases on both sides. Pyramid levels halve down to 1.0 µm/px, the
resolution the demo tiles at, so every hospital has that level as it is.
"""

from __future__ import annotations

import csv
import json
import logging
import string
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from formats.atomic import atomic_path
from wsi.synthetic import (
    StainProfile,
    SyntheticSlide,
    SyntheticSlideSpec,
    hospital_stain_profile,
    tumour_geojson,
    write_synthetic_slide,
    written_with,
)

from .isolation import run_isolated

log = logging.getLogger(__name__)

# Tiling resolution of configs/demo.yaml: the coarsest pyramid level of every demo slide.
TILING_MPP = 1.0
LEVEL_DOWNSAMPLE = 2
# 320 µm is 320 px at 1.0 µm/px: with tissue on 50-65 % of it, `make demo` tiles about 17
# patches of 64 px from each slide. Slide-level DP counts slides, not patches, so the demo has
# many small slides rather than few large ones. Rendering time grows with tissue area, so the
# slides carry more tissue and less glass than the generator's default.
DEFAULT_SIZE_UM = 320
TISSUE_FRACTION = (0.5, 0.65)
# Slide sides are whole 16-µm steps, so each level of either scanner has an integer size.
SIZE_STEP_UM = 16
MIN_SIZE_UM = 256
DEFAULT_HOSPITALS = 4
# Difficulty (SyntheticSlideSpec.tumour_contrast): tumour nuclei 25 % of the way from normal
# stroma to the generator's full contrast. At 1.0 µm/px they are denser, larger and darker than
# normal ones, yet sparser and paler than an inflamed mimic's lymphocytes; at 0.5 tumour
# patches were obvious at a glance, at 0.3 barely told apart. At 0.4 every model of the demo
# scored slide AUC 1.0, which tells nothing; at 0.25 hospitals alone stay below it.
DEFAULT_TUMOUR_CONTRAST = 0.25
# Tumour slides whose only tumour is one or two small foci (1-4 patches of 64 µm).
FOCAL_SHARE = 0.25
MAX_INFLAMED_REGIONS = 2
MAX_HOSPITALS = len(string.ascii_lowercase)
LABEL_COLUMNS = ("slide_id", "path", "label", "annotation")

# (slides, level-0 µm/px, tumour prevalence) of hospitals a, b, c, d; later ones repeat the
# cycle with their own stain. b's 20× slides cost a quarter of a 40× one to render, so b is the
# largest; c is small (16 training slides at a 40 % share).
_PROFILE_CYCLE = ((120, 0.25, 0.5), (150, 0.5, 0.35), (40, 0.25, 0.6), (110, 0.25, 0.3))


class CohortError(ValueError):
    """The cohort cannot be written as asked."""


@dataclass(frozen=True)
class HospitalProfile:
    """How one demo hospital differs from the others."""

    name: str
    slides: int
    mpp: float  # level 0 of its scanner, µm/px
    prevalence: float  # share of tumour slides
    stain: StainProfile


@dataclass(frozen=True)
class DemoSlide:
    """One planned slide of the demo cohort."""

    hospital: str
    slide_id: str
    label: int
    spec: SyntheticSlideSpec


def hospital_name(index: int) -> str:
    """Directory name of hospital ``index``: hospital_a, hospital_b, ... (sorts in order)."""
    return f"hospital_{string.ascii_lowercase[index]}"


def hospital_profile(index: int) -> HospitalProfile:
    """Deterministic profile of hospital ``index`` (0, 1, 2, ...), whatever the cohort size."""
    slides, mpp, prevalence = _PROFILE_CYCLE[index % len(_PROFILE_CYCLE)]
    return HospitalProfile(hospital_name(index), slides, mpp, prevalence,
                           hospital_stain_profile(index))


def plan_demo_cohort(hospitals: int = DEFAULT_HOSPITALS,
                     slides_per_hospital: Sequence[int] | None = None,
                     size_um: int = DEFAULT_SIZE_UM,
                     tumour_contrast: float = DEFAULT_TUMOUR_CONTRAST,
                     seed: int = 0) -> list[DemoSlide]:
    """Every slide of the cohort, with its label and spec; deterministic in ``seed``.

    ``slides_per_hospital`` overrides the profiles' sizes: one number for every hospital, or
    one per hospital. Slides are ``size_um`` µm wide and 75-100 % as high. A hospital has
    ``round(prevalence * slides)`` tumour slides (at least one, and one normal slide when it has
    two or more); of these, :data:`FOCAL_SHARE` hold one or two small foci and the rest one or
    two large regions. Any slide may hold up to :data:`MAX_INFLAMED_REGIONS` tumour mimics.
    """
    counts = _slide_counts(hospitals, slides_per_hospital)
    if size_um < MIN_SIZE_UM or size_um % SIZE_STEP_UM:
        raise CohortError(f"size_um={size_um} must be a multiple of {SIZE_STEP_UM} µm, at "
                          f"least {MIN_SIZE_UM}")
    if not 0.0 <= tumour_contrast <= 1.0:
        raise CohortError(f"tumour_contrast={tumour_contrast} must be between 0 and 1")
    if seed < 0:
        raise CohortError(f"seed={seed} must be non-negative")
    plan = []
    for h, count in enumerate(counts):
        profile = hospital_profile(h)
        rng = np.random.default_rng((seed, h))
        tumours = min(max(round(profile.prevalence * count), 1), max(count - 1, 1))
        focal = round(FOCAL_SHARE * tumours)
        kinds = rng.permutation(["focal"] * focal + ["large"] * (tumours - focal)
                                + ["normal"] * (count - tumours))
        for s, kind in enumerate(kinds):
            height_um = int(size_um * rng.uniform(0.75, 1.0)) // SIZE_STEP_UM * SIZE_STEP_UM
            spec = SyntheticSlideSpec(
                width=round(size_um / profile.mpp),
                height=round(height_um / profile.mpp),
                mpp=profile.mpp,
                tumour_regions=int(rng.integers(1, 3)) if kind == "large" else 0,
                tumour_foci=int(rng.integers(1, 3)) if kind == "focal" else 0,
                tumour_contrast=tumour_contrast,
                inflamed_regions=int(rng.integers(0, MAX_INFLAMED_REGIONS + 1)),
                tissue_fraction=TISSUE_FRACTION,
                stain=profile.stain,
                seed=int(rng.integers(2**31)),
                level_downsample=LEVEL_DOWNSAMPLE,
                # The pyramid stops at the tiling level: nothing reads a coarser one, and
                # tissue detection's overview of a slide this small is finer than it.
                smallest_level_px=round(size_um / TILING_MPP),
            )
            plan.append(DemoSlide(profile.name, f"{profile.name}_{s:03d}",
                                  int(kind != "normal"), spec))
    return plan


def _annotation_path(hospital_dir: Path, slide_id: str) -> Path:
    return hospital_dir / "annotations" / f"{slide_id}.geojson"


def _slide_counts(hospitals: int, slides_per_hospital: Sequence[int] | None) -> list[int]:
    if not 1 <= hospitals <= MAX_HOSPITALS:
        raise CohortError(f"hospitals={hospitals} must be between 1 and {MAX_HOSPITALS}")
    if slides_per_hospital is None:
        return [hospital_profile(h).slides for h in range(hospitals)]
    counts = list(slides_per_hospital)
    if len(counts) == 1:
        counts *= hospitals
    if len(counts) != hospitals:
        raise CohortError(f"slides_per_hospital={counts} needs one number or {hospitals}")
    if min(counts) < 1:
        raise CohortError(f"slides_per_hospital={counts} must all be at least 1")
    return counts


def _materialize(out_dir: Path, planned: DemoSlide) -> SyntheticSlide:
    """Write one planned slide and its annotations (or keep an identical existing one)."""
    hospital_dir = out_dir / planned.hospital
    slide_path = hospital_dir / "slides" / f"{planned.slide_id}.tiff"
    if slide_path.exists():
        if not written_with(slide_path, planned.spec):
            raise CohortError(f"{slide_path} exists but was not written with these cohort "
                              "settings; use another directory or delete it")
        log.debug("keeping %s", slide_path)
        slide = SyntheticSlide.from_spec(slide_path, planned.spec)
    else:
        slide_path.parent.mkdir(parents=True, exist_ok=True)
        slide = write_synthetic_slide(slide_path, planned.spec)
    _write_json(_annotation_path(hospital_dir, planned.slide_id),
                tumour_geojson(slide.tumour_polygons))
    return slide


def make_demo_cohort(out_dir: Path, hospitals: int = DEFAULT_HOSPITALS,
                     slides_per_hospital: Sequence[int] | None = None,
                     size_um: int = DEFAULT_SIZE_UM,
                     tumour_contrast: float = DEFAULT_TUMOUR_CONTRAST, seed: int = 0,
                     workers: int = 1) -> list[Path]:
    """Write the demo cohort under ``out_dir``, ``workers`` slides at a time; return the
    hospital directories, in order.

    Idempotent: a slide that already exists and was written from the same spec is not
    rendered again. One written from a different spec (say another ``size_um``) is an error,
    so that annotations never disagree with pixels. Arguments as :func:`plan_demo_cohort`.
    """
    out_dir = Path(out_dir)
    plan = plan_demo_cohort(hospitals, slides_per_hospital, size_um, tumour_contrast, seed)
    written_by_id: dict[str, SyntheticSlide] = {}
    jobs = run_isolated(partial(_materialize, out_dir), plan, workers)
    for planned, outcome in tqdm(jobs, total=len(plan), desc="demo cohort", unit="slide"):
        if outcome.result is None:
            raise CohortError(outcome.error or f"{planned.slide_id}: not written")
        written_by_id[planned.slide_id] = outcome.result
    slides: dict[str, list[tuple[DemoSlide, SyntheticSlide]]] = {}
    for planned in plan:
        slides.setdefault(planned.hospital, []).append((planned, written_by_id[planned.slide_id]))
    for hospital, written in slides.items():
        _write_labels(out_dir / hospital / "labels.csv", written)
    log.info("demo cohort of %d slides in %d hospitals at %s", len(plan), len(slides), out_dir)
    return [out_dir / hospital for hospital in slides]


def _write_json(path: Path, document: dict) -> None:
    with atomic_path(path) as partial:
        partial.write_text(json.dumps(document) + "\n")


def _write_labels(path: Path, slides: list[tuple[DemoSlide, SyntheticSlide]]) -> None:
    with atomic_path(path) as partial, partial.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(LABEL_COLUMNS)
        for planned, slide in slides:
            annotation = _annotation_path(path.parent, planned.slide_id)
            writer.writerow([planned.slide_id, slide.path.relative_to(path.parent).as_posix(),
                             planned.label, annotation.relative_to(path.parent).as_posix()])

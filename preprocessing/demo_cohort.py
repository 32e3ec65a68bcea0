"""A small synthetic multi-hospital cohort: slides, slide labels and tumour annotations.

Layout, one directory per hospital (``hospital_a``, ``hospital_b``, ...)::

    <out>/<hospital>/slides/<slide_id>.tiff          synthetic H&E slide (wsi.synthetic)
    <out>/<hospital>/labels.csv                      slide_id,path,label,annotation
    <out>/<hospital>/annotations/<slide_id>.geojson  tumour polygons, level-0 px

``path`` and ``annotation`` in labels.csv are relative to the CSV's own directory, so a cohort
can be moved or copied as a whole. ``label`` is 1 for a slide with tumour and 0 for a normal
one; each hospital gets half of each (the odd one out is a tumour slide) and its own stain
profile, so hospitals differ in colour as real ones do. Normal slides have an empty
FeatureCollection: annotated, no tumour, so their patches are labelled 0 from the annotation.

Slides are 0.25 µm/px at level 0 with downsample-2 pyramid levels, so tiling at 0.5 µm/px reads
level 1 as it is.
"""

from __future__ import annotations

import csv
import json
import logging
import string
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from slidefed.atomic import atomic_path
from wsi.synthetic import (
    SyntheticSlide,
    SyntheticSlideSpec,
    hospital_stain_profile,
    tumour_geojson,
    write_synthetic_slide,
    written_with,
)

from .isolation import run_isolated

log = logging.getLogger(__name__)

DEFAULT_HOSPITALS = 3
DEFAULT_SLIDES_PER_HOSPITAL = 8
# 6656 px at 0.25 µm/px is 1.7 mm: about 50-90 patches of 256 px at 0.5 µm/px that are at
# least half tissue.
DEFAULT_SIZE = 6656
LEVEL0_MPP = 0.25
LEVEL_DOWNSAMPLE = 2
# Small enough that every cohort slide has its 0.5 µm/px level.
SMALLEST_LEVEL_PX = 512
MIN_SIZE = 2 * SMALLEST_LEVEL_PX
MAX_HOSPITALS = len(string.ascii_lowercase)
LABEL_COLUMNS = ("slide_id", "path", "label", "annotation")


class CohortError(ValueError):
    """The cohort cannot be written as asked."""


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


def plan_demo_cohort(hospitals: int = DEFAULT_HOSPITALS,
                     slides_per_hospital: int = DEFAULT_SLIDES_PER_HOSPITAL,
                     size: int = DEFAULT_SIZE, seed: int = 0) -> list[DemoSlide]:
    """Every slide of the cohort, with its label and spec; deterministic in ``seed``.

    Slides are ``size`` px wide and 75-100 % as high; tumour slides have one or two tumour
    regions.
    """
    if not 1 <= hospitals <= MAX_HOSPITALS:
        raise CohortError(f"hospitals={hospitals} must be between 1 and {MAX_HOSPITALS}")
    if slides_per_hospital < 1:
        raise CohortError(f"slides_per_hospital={slides_per_hospital} must be at least 1")
    if size < MIN_SIZE:
        raise CohortError(f"size={size} must be at least {MIN_SIZE} px")
    if seed < 0:
        raise CohortError(f"seed={seed} must be non-negative")
    plan = []
    for h in range(hospitals):
        name = hospital_name(h)
        rng = np.random.default_rng((seed, h))
        labels = rng.permutation([1] * ((slides_per_hospital + 1) // 2)
                                 + [0] * (slides_per_hospital // 2))
        for s, label in enumerate(labels):
            spec = SyntheticSlideSpec(
                width=size,
                height=int(size * rng.uniform(0.75, 1.0)) // 64 * 64,  # even level sizes
                mpp=LEVEL0_MPP,
                tumour_regions=int(rng.integers(1, 3)) if label else 0,
                stain=hospital_stain_profile(h),
                seed=int(rng.integers(2**31)),
                level_downsample=LEVEL_DOWNSAMPLE,
                smallest_level_px=SMALLEST_LEVEL_PX,
            )
            plan.append(DemoSlide(name, f"{name}_{s:03d}", int(label), spec))
    return plan


def _annotation_path(hospital_dir: Path, slide_id: str) -> Path:
    return hospital_dir / "annotations" / f"{slide_id}.geojson"


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
                     slides_per_hospital: int = DEFAULT_SLIDES_PER_HOSPITAL,
                     size: int = DEFAULT_SIZE, seed: int = 0, workers: int = 1) -> list[Path]:
    """Write the demo cohort under ``out_dir``, ``workers`` slides at a time; return the
    hospital directories, in order.

    Idempotent: a slide that already exists and was written from the same spec is not
    rendered again. One written from a different spec (say another ``size``) is an error, so
    that annotations never disagree with pixels.
    """
    out_dir = Path(out_dir)
    plan = plan_demo_cohort(hospitals, slides_per_hospital, size, seed)
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

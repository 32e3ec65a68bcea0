"""The demo cohort: its plan's promises, files, labels that agree with annotations, idempotence."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict

import numpy as np
import openslide
import pytest

from preprocessing.demo_cohort import (
    DEFAULT_SIZE_UM,
    TILING_MPP,
    CohortError,
    hospital_profile,
    make_demo_cohort,
    plan_demo_cohort,
)
from wsi.synthetic import SyntheticSlide

SMALL = {"hospitals": 2, "slides_per_hospital": [3, 2], "size_um": 256, "seed": 7}
PATCH_UM = 64.0  # what configs/demo.yaml tiles: 64 px at 1.0 µm/px


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    return out, make_demo_cohort(out, **SMALL)


@pytest.fixture(scope="module")
def default_plan():
    return plan_demo_cohort()


def read_labels(hospital_dir):
    with (hospital_dir / "labels.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["slide_id", "path", "label", "annotation"]
        return list(reader)


def planned_spec(slide_id):
    (planned,) = [p for p in plan_demo_cohort(**SMALL) if p.slide_id == slide_id]
    return planned.spec


def by_hospital(plan):
    hospitals = defaultdict(list)
    for planned in plan:
        hospitals[planned.hospital].append(planned)
    return hospitals


def test_default_plan_is_large_and_varied_enough_for_a_slide_level_comparison(default_plan):
    hospitals = by_hospital(default_plan)
    assert list(hospitals) == ["hospital_a", "hospital_b", "hospital_c", "hospital_d"]
    assert 400 <= len(default_plan) <= 450
    # A 40 % test split stratified by label, rounded down in every hospital and label.
    test_slides = sum(math.floor(0.4 * sum(p.label == label for p in slides))
                      for slides in hospitals.values() for label in (0, 1))
    assert test_slides >= 60
    sizes = sorted(len(slides) for slides in hospitals.values())
    assert sizes[0] <= 40 and sizes[1] >= 100
    mpps = {name: {p.spec.mpp for p in slides} for name, slides in hospitals.items()}
    assert sorted(mpps.values(), key=min) == [{0.25}, {0.25}, {0.25}, {0.5}]
    prevalences = [np.mean([p.label for p in slides]) for slides in hospitals.values()]
    assert len(set(prevalences)) == len(prevalences)
    assert all(0.25 <= p <= 0.65 for p in prevalences)
    assert {p.spec.inflamed_regions > 0 for p in default_plan if p.label == 0} == {True, False}
    assert any(p.spec.inflamed_regions > 0 for p in default_plan if p.label == 1)


def test_every_slide_has_the_tiling_level_over_the_same_tissue_size(default_plan):
    for planned in default_plan:
        spec = planned.spec
        level_mpps = [spec.mpp * d for d in spec.level_downsamples]
        assert level_mpps[-1] == TILING_MPP  # the coarsest level, read as it is
        assert spec.level_downsample == 2
        assert spec.width * spec.mpp == DEFAULT_SIZE_UM == 320
        width, height = spec.level_dimensions[-1]
        assert (width * TILING_MPP, height * TILING_MPP) == (320, spec.height * spec.mpp)


def test_some_tumour_slides_hold_only_foci_of_one_to_four_patches(default_plan):
    focal = [p for p in default_plan if p.spec.tumour_foci > 0]
    assert focal and all(p.label == 1 and p.spec.tumour_regions == 0 for p in focal)
    assert len(by_hospital(focal)) == 4
    for planned in focal[:12]:
        slide = SyntheticSlide.from_spec(planned.slide_id, planned.spec)
        assert 1 <= len(slide.tumour_polygons) <= 2
        for polygon in slide.tumour_polygons:
            area = 0.5 * abs(np.dot(polygon[:, 0], np.roll(polygon[:, 1], -1))
                             - np.dot(polygon[:, 1], np.roll(polygon[:, 0], -1)))
            patches = area * planned.spec.mpp ** 2 / PATCH_UM**2
            assert 0.5 <= patches <= 4, (planned.slide_id, patches)


def test_hospital_profiles_do_not_depend_on_the_cohort_size():
    four = plan_demo_cohort(hospitals=4, slides_per_hospital=[2])
    two = plan_demo_cohort(hospitals=2, slides_per_hospital=[2])
    assert two == [p for p in four if p.hospital in ("hospital_a", "hospital_b")]
    six = by_hospital(plan_demo_cohort(hospitals=6))
    assert [len(s) for s in six.values()] == [hospital_profile(h).slides for h in range(6)]
    assert hospital_profile(4).mpp == hospital_profile(0).mpp
    assert hospital_profile(4).stain != hospital_profile(0).stain


def test_writes_one_directory_per_hospital_with_the_promised_files(cohort):
    out, hospitals = cohort
    assert hospitals == [out / "hospital_a", out / "hospital_b"]
    assert sorted(p.name for p in out.iterdir()) == ["hospital_a", "hospital_b"]
    for hospital_dir, count, mpp in zip(hospitals, SMALL["slides_per_hospital"], (0.25, 0.5),
                                        strict=True):
        rows = read_labels(hospital_dir)
        assert len(rows) == count
        for row in rows:
            assert row["path"] == f"slides/{row['slide_id']}.tiff"  # relative to the CSV
            with openslide.OpenSlide(hospital_dir / row["path"]) as slide:
                assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == mpp
                assert slide.level_downsamples[-1] == pytest.approx(TILING_MPP / mpp)
                assert slide.dimensions[0] * mpp == SMALL["size_um"]
            assert row["annotation"] == f"annotations/{row['slide_id']}.geojson"
            assert (hospital_dir / row["annotation"]).is_file()
        assert sorted(p.name for p in hospital_dir.iterdir()) == [
            "annotations", "labels.csv", "slides"]


def test_labels_agree_with_annotations_and_large_tumours_are_large(cohort):
    out, hospitals = cohort
    for hospital_dir in hospitals:
        rows = read_labels(hospital_dir)
        assert {row["label"] for row in rows} == {"0", "1"}
        for row in rows:
            annotation = hospital_dir / "annotations" / f"{row['slide_id']}.geojson"
            features = json.loads(annotation.read_text())["features"]
            assert (len(features) > 0) == (row["label"] == "1")
            spec = planned_spec(row["slide_id"])
            if spec.tumour_regions:
                with openslide.OpenSlide(hospital_dir / row["path"]) as slide:
                    rgb = np.asarray(slide.read_region((0, 0), 1, slide.level_dimensions[1])
                                     .convert("RGB")).astype(int)
                    downsample = slide.level_downsamples[1]
                tissue = rgb.min(axis=-1) < 215
                polygons = [np.asarray(f["geometry"]["coordinates"][0][:-1]) for f in features]
                annotated = SyntheticSlide(hospital_dir / row["path"], spec, polygons)
                tumour = annotated.tumour_mask(downsample)[:rgb.shape[0], :rgb.shape[1]]
                assert (tumour & tissue).sum() >= 0.2 * tissue.sum()


def test_hospitals_get_their_own_stain_and_slides_their_own_seed():
    plan = plan_demo_cohort(**SMALL)
    stains = {p.hospital: p.spec.stain for p in plan}
    assert len(set(stains.values())) == SMALL["hospitals"]
    assert len({p.spec.seed for p in plan}) == len(plan)
    assert plan == plan_demo_cohort(**SMALL)
    assert plan != plan_demo_cohort(**{**SMALL, "seed": 8})
    assert {p.spec.tumour_contrast for p in plan_demo_cohort(**SMALL, tumour_contrast=0.9)} == {
        0.9}


def test_second_run_keeps_slides_and_other_settings_are_refused(cohort):
    out, hospitals = cohort
    slides = sorted(out.glob("*/slides/*.tiff"))
    stamps = [p.stat().st_mtime_ns for p in slides]
    assert make_demo_cohort(out, **SMALL) == hospitals
    assert [p.stat().st_mtime_ns for p in slides] == stamps
    with pytest.raises(CohortError, match="hospital_a_000.tiff"):
        make_demo_cohort(out, **{**SMALL, "size_um": 320})


@pytest.mark.parametrize("arguments", [
    {"hospitals": 0}, {"hospitals": 27}, {"slides_per_hospital": [0]},
    {"hospitals": 2, "slides_per_hospital": [1, 2, 3]}, {"size_um": 128}, {"size_um": 650},
    {"tumour_contrast": 1.5}, {"seed": -1}])
def test_impossible_cohorts_are_refused(tmp_path, arguments):
    with pytest.raises(CohortError):
        make_demo_cohort(tmp_path, **arguments)
    assert list(tmp_path.iterdir()) == []

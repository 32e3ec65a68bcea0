"""The demo cohort: files, labels that agree with annotations, idempotence."""

from __future__ import annotations

import csv
import json

import numpy as np
import openslide
import pytest

from preprocessing.demo_cohort import CohortError, make_demo_cohort, plan_demo_cohort
from wsi.synthetic import SyntheticSlide

SMALL = {"hospitals": 2, "slides_per_hospital": 3, "size": 1024, "seed": 7}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    return out, make_demo_cohort(out, **SMALL)


def read_labels(hospital_dir):
    with (hospital_dir / "labels.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["slide_id", "path", "label", "annotation"]
        return list(reader)


def planned_spec(slide_id):
    (planned,) = [p for p in plan_demo_cohort(**SMALL) if p.slide_id == slide_id]
    return planned.spec


def test_writes_one_directory_per_hospital_with_the_promised_files(cohort):
    out, hospitals = cohort
    assert hospitals == [out / "hospital_a", out / "hospital_b"]
    assert sorted(p.name for p in out.iterdir()) == ["hospital_a", "hospital_b"]
    for hospital_dir in hospitals:
        rows = read_labels(hospital_dir)
        assert len(rows) == SMALL["slides_per_hospital"]
        for row in rows:
            assert row["path"] == f"slides/{row['slide_id']}.tiff"  # relative to the CSV
            with openslide.OpenSlide(hospital_dir / row["path"]) as slide:
                assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == 0.25
                assert slide.level_downsamples[1] == 2.0  # 0.5 µm/px as it is
            assert row["annotation"] == f"annotations/{row['slide_id']}.geojson"
            assert (hospital_dir / row["annotation"]).is_file()
        assert sorted(p.name for p in hospital_dir.iterdir()) == [
            "annotations", "labels.csv", "slides"]


def test_labels_agree_with_annotations_and_tumours_are_large(cohort):
    out, hospitals = cohort
    for hospital_dir in hospitals:
        rows = read_labels(hospital_dir)
        labels = [int(row["label"]) for row in rows]
        assert sorted(labels) == [0, 1, 1]  # half each, the odd one a tumour slide
        for row in rows:
            annotation = hospital_dir / "annotations" / f"{row['slide_id']}.geojson"
            features = json.loads(annotation.read_text())["features"]
            assert (len(features) > 0) == (row["label"] == "1")
            if features:
                with openslide.OpenSlide(hospital_dir / row["path"]) as slide:
                    rgb = np.asarray(slide.read_region((0, 0), 1, slide.level_dimensions[1])
                                     .convert("RGB")).astype(int)
                tissue = rgb.min(axis=-1) < 215
                polygons = [np.asarray(f["geometry"]["coordinates"][0][:-1]) for f in features]
                annotated = SyntheticSlide(hospital_dir / row["path"],
                                           planned_spec(row["slide_id"]), polygons)
                tumour = annotated.tumour_mask(2)[:rgb.shape[0], :rgb.shape[1]]
                assert (tumour & tissue).sum() >= 0.2 * tissue.sum()


def test_hospitals_get_their_own_stain_and_slides_their_own_seed():
    plan = plan_demo_cohort(**SMALL)
    stains = {p.hospital: p.spec.stain for p in plan}
    assert len(set(stains.values())) == SMALL["hospitals"]
    assert len({p.spec.seed for p in plan}) == len(plan)
    assert plan == plan_demo_cohort(**SMALL)
    assert plan != plan_demo_cohort(**{**SMALL, "seed": 8})


def test_second_run_keeps_slides_and_other_settings_are_refused(cohort):
    out, hospitals = cohort
    slides = sorted(out.glob("*/slides/*.tiff"))
    stamps = [p.stat().st_mtime_ns for p in slides]
    assert make_demo_cohort(out, **SMALL) == hospitals
    assert [p.stat().st_mtime_ns for p in slides] == stamps
    with pytest.raises(CohortError, match="hospital_a_000.tiff"):
        make_demo_cohort(out, **{**SMALL, "size": 1536})


@pytest.mark.parametrize("arguments", [{"hospitals": 0}, {"hospitals": 27},
                                       {"slides_per_hospital": 0}, {"size": 1000}, {"seed": -1}])
def test_impossible_cohorts_are_refused(tmp_path, arguments):
    with pytest.raises(CohortError):
        make_demo_cohort(tmp_path, **arguments)
    assert list(tmp_path.iterdir()) == []

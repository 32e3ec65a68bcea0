"""Tumour annotations: GeoJSON as QuPath writes it, and exact tumour fractions per patch."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import shapely

from wsi.annotations import (
    AnnotationError,
    AnnotationRules,
    read_tumour_annotation,
    tumour_fractions,
)


def feature(geometry, classification="Tumor", **properties):
    if classification is not None:
        properties["classification"] = {"name": classification, "color": [200, 0, 0]}
    return {"type": "Feature", "geometry": geometry,
            "properties": {"objectType": "annotation", **properties}}


def polygon(*rings):
    return {"type": "Polygon", "coordinates": [[list(p) for p in ring] for ring in rings]}


def square(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]


def write(tmp_path, document, name="a.geojson"):
    path = tmp_path / name
    path.write_text(json.dumps(document))
    return path


def collection(*features):
    return {"type": "FeatureCollection", "features": list(features)}


def fractions_of(tmp_path, document, coords, step=100, rules=None):
    polygons = read_tumour_annotation(write(tmp_path, document), rules)
    return tumour_fractions(polygons, np.array(coords), step).tolist()


def test_a_square_over_half_a_patch_is_half_and_outside_patches_are_zero(tmp_path):
    doc = collection(feature(polygon(square(100, 0, 150, 100))))
    assert fractions_of(tmp_path, doc, [[100, 0], [0, 0], [300, 300]]) == [0.5, 0.0, 0.0]


def test_holes_are_not_tumour(tmp_path):
    doc = collection(feature(polygon(square(0, 0, 200, 100), square(25, 25, 75, 75))))
    assert fractions_of(tmp_path, doc, [[0, 0], [100, 0]]) == [0.75, 1.0]


def test_multipolygons_and_overlaps_count_each_area_once(tmp_path):
    multi = {"type": "MultiPolygon", "coordinates": [
        [square(0, 0, 50, 100)], [[list(p) for p in square(100, 0, 125, 40)]]]}
    overlapping = polygon(square(0, 0, 100, 50))  # overlaps half of the first part
    doc = collection(feature(multi), feature(overlapping))
    # patch 0: 50x100 + the other 50x50 = 7500; patch 1: 25x40 = 1000
    assert fractions_of(tmp_path, doc, [[0, 0], [100, 0]]) == [0.75, pytest.approx(0.1)]


def test_fractions_are_exact_for_an_irregular_polygon_on_a_large_grid(tmp_path):
    blob = shapely.Point(1000, 800).buffer(600, 64)
    skewed = shapely.affinity.scale(blob, 1.5, 0.7)
    doc = {"type": "Feature", "geometry": shapely.geometry.mapping(skewed),
           "properties": {}}  # a single, unclassified Feature
    coords = np.stack(np.meshgrid(np.arange(0, 3000, 64), np.arange(0, 2000, 64)),
                      -1).reshape(-1, 2)
    fractions = np.array(fractions_of(tmp_path, doc, coords, step=64))
    expected = [shapely.box(x, y, x + 64, y + 64).intersection(skewed).area / 64 ** 2
                for x, y in coords]
    np.testing.assert_allclose(fractions, expected, atol=1e-6)
    assert fractions.sum() * 64 ** 2 == pytest.approx(skewed.area, rel=1e-5)


def test_which_features_count_as_tumour(tmp_path):
    doc = [  # a bare list of Features
        feature(polygon(square(0, 0, 10, 100)), "tumour"),  # case-insensitive
        feature(polygon(square(10, 0, 20, 100)), "Stroma"),
        feature(polygon(square(20, 0, 30, 100)), None),
        feature(polygon(square(30, 0, 40, 100)), "Carcinoma"),
        {**feature(polygon(square(40, 0, 50, 100))), "properties": {
            "objectType": "detection", "classification": {"name": "Tumor"}}},
        feature({"type": "Point", "coordinates": [60, 50]}),
    ]
    assert fractions_of(tmp_path, doc, [[0, 0]]) == [pytest.approx(0.2)]
    rules = AnnotationRules(tumour_classes=("Carcinoma",), unclassified_is_tumour=False)
    assert fractions_of(tmp_path, doc, [[0, 0]], rules=rules) == [pytest.approx(0.1)]


def test_a_bare_geometry_and_an_empty_collection(tmp_path):
    assert fractions_of(tmp_path, polygon(square(0, 0, 100, 20)), [[0, 0]]) == [
        pytest.approx(0.2)]
    assert read_tumour_annotation(write(tmp_path, collection())) == []
    assert tumour_fractions([], np.array([[0, 0]]), 100).tolist() == [0.0]


def test_self_intersecting_polygons_are_repaired_with_a_warning(tmp_path, caplog):
    bow_tie = polygon([(0, 0), (100, 100), (100, 0), (0, 100), (0, 0)])
    with caplog.at_level(logging.WARNING):
        assert fractions_of(tmp_path, collection(feature(bow_tie)), [[0, 0]]) == [0.5]
    assert "make_valid" in caplog.text


@pytest.mark.parametrize("text, problem", [
    ("{not json", "not valid JSON"),
    ('"a string"', "expected an object or a list"),
    ('{"type": "Topology"}', "type 'Topology'"),
    ('{"type": "FeatureCollection"}', "no 'features' list"),
    (json.dumps(collection({"type": "Point"})), "feature 0 is not a GeoJSON Feature"),
    (json.dumps(collection(feature({"type": "Point", "coordinates": [1, 2]}))),
     "no tumour polygon among 1 features"),
    (json.dumps(collection(feature(polygon(square(0, 0, 9, 9)), "Stroma"))),
     "tumour classes are Tumor, Tumour"),
    (json.dumps(collection(feature({"type": "Polygon", "coordinates": [[1, 2]]}))),
     "feature 0: malformed Polygon"),
    (json.dumps(collection(feature(polygon([(0, 0), (5, 5), (0, 0)])))), "no area"),
])
def test_unusable_files_are_one_line_errors_naming_the_file(tmp_path, text, problem):
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(AnnotationError, match=problem) as err:
        read_tumour_annotation(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_missing_files_and_polygons_off_the_slide_are_refused(tmp_path):
    with pytest.raises(AnnotationError, match="annotation file not found"):
        read_tumour_annotation(tmp_path / "none.geojson")
    in_microns = write(tmp_path, collection(feature(polygon(square(5000, 5000, 6000, 6000)))))
    assert read_tumour_annotation(in_microns, extent=(8000, 8000))
    with pytest.raises(AnnotationError, match="outside the slide's level-0 4096x4096 px"):
        read_tumour_annotation(in_microns, extent=(4096, 4096))

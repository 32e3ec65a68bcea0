"""Tumour annotations (GeoJSON, level-0 pixels) and the tumour-area fraction of each patch.

Reads what QuPath exports ("Export objects as GeoJSON") and what ``slidefed demo-cohort``
writes: a FeatureCollection, a bare list of Features, a single Feature, or a bare Polygon /
MultiPolygon geometry. Coordinates are level-0 pixels of the slide, (x, y), as QuPath and
OpenSlide use them. Holes are holes.

Which features are tumour (:class:`AnnotationRules`):

- a feature counts when its QuPath classification name (``properties.classification.name``,
  or a plain string there) is one of ``tumour_classes`` (default ``Tumor``, ``Tumour``),
  compared case-insensitively;
- a feature with no classification counts as tumour by default: a file handed over as *the
  tumour annotation* of a slide that does not classify its polygons (hand-drawn outlines,
  converted CAMELYON XML) means them as tumour. ``unclassified_is_tumour=False`` ignores them;
- QuPath objects that are not annotations (``objectType`` ``detection``, ``cell``, ``tile``)
  are skipped: cell outlines are not tumour regions;
- Points and lines are skipped with a warning; self-intersecting polygons are repaired with
  shapely's ``make_valid`` (with a warning) and their polygonal part kept.

An empty FeatureCollection (or list) means "annotated, no tumour": every patch gets fraction
0. A file that has features but none usable as tumour polygons is an error rather than "no
tumour", so that a misspelt class name or a file of points never labels a slide normal
silently. Every error is an :class:`AnnotationError` naming the file, in one line.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from formats.errors import one_line

if TYPE_CHECKING:
    import shapely

# shapely is imported by the functions that use it: AnnotationRules is part of the tiling
# options that every `slidefed` command (every MPI rank of `federate`, too) builds on start.

log = logging.getLogger(__name__)

DEFAULT_TUMOUR_CLASSES = ("Tumor", "Tumour")
POLYGONAL = ("Polygon", "MultiPolygon")
# QuPath's objectType values other than this one are detections of cells and tiles.
ANNOTATION_OBJECT_TYPE = "annotation"


class AnnotationError(ValueError):
    """An annotation file is unusable. ``str()`` is one line: ``<path>: <reason>``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class AnnotationRules:
    """Which GeoJSON features count as tumour (see the module docstring)."""

    tumour_classes: tuple[str, ...] = DEFAULT_TUMOUR_CLASSES
    unclassified_is_tumour: bool = True

    def __post_init__(self) -> None:
        if not self.tumour_classes or not all(c.strip() for c in self.tumour_classes):
            raise ValueError(f"tumour classes must be non-empty names, got {self.tumour_classes}")

    def is_tumour(self, classification: str | None) -> bool:
        """Whether a feature of QuPath class ``classification`` (None: unclassified) counts."""
        if classification is None:
            return self.unclassified_is_tumour
        return classification.casefold() in {c.casefold() for c in self.tumour_classes}


def _features(path: Path, document: object) -> list:
    if isinstance(document, list):
        return document
    if not isinstance(document, dict):
        raise AnnotationError(path, "not GeoJSON: expected an object or a list of Features")
    kind = document.get("type")
    if kind == "FeatureCollection":
        features = document.get("features")
        if not isinstance(features, list):
            raise AnnotationError(path, "FeatureCollection has no 'features' list")
        return features
    if kind == "Feature":
        return [document]
    if kind in POLYGONAL:
        return [{"type": "Feature", "geometry": document, "properties": {}}]
    raise AnnotationError(path, f"not a GeoJSON FeatureCollection, Feature or polygon "
                                f"(type {kind!r})")


def _classification(properties: dict) -> str | None:
    value = properties.get("classification")
    if isinstance(value, dict):
        value = value.get("name")
    return value if isinstance(value, str) and value.strip() else None


def read_tumour_annotation(path: str | Path, rules: AnnotationRules | None = None,
                           extent: tuple[int, int] | None = None) -> list[shapely.Polygon]:
    """The tumour region of ``path`` as non-overlapping polygons (level-0 px), maybe none.

    Overlapping features are merged first, so that an area annotated twice counts once.
    Raises :class:`AnnotationError` naming the file when it is missing, not JSON/GeoJSON, has
    features of which none is a usable tumour polygon, or (given the slide's level-0
    ``extent``, width and height) when no polygon meets the slide: coordinates in another
    frame (µm, a lower level) would otherwise label every patch normal.
    """
    import shapely

    path, rules = Path(path), rules or AnnotationRules()
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise AnnotationError(path, "annotation file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationError(path, f"not valid JSON ({one_line(exc)})") from None
    features = _features(path, document)
    skipped: Counter[str] = Counter()
    polygons: list[shapely.Geometry] = []
    for i, feature in enumerate(features):
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise AnnotationError(path, f"feature {i} is not a GeoJSON Feature")
        properties = feature.get("properties") or {}
        if not isinstance(properties, dict):
            raise AnnotationError(path, f"feature {i} has properties that are not an object")
        object_type = properties.get("objectType", ANNOTATION_OBJECT_TYPE)
        classification = _classification(properties)
        geometry = feature.get("geometry") or {}
        kind = geometry.get("type") if isinstance(geometry, dict) else None
        if object_type != ANNOTATION_OBJECT_TYPE:
            skipped[f"{object_type} objects"] += 1
        elif not rules.is_tumour(classification):
            skipped[f"class {classification or 'unclassified'}"] += 1
        elif kind not in POLYGONAL:
            skipped[f"{kind or 'empty'} geometries"] += 1
        else:
            polygons.append(_polygonal(path, i, geometry))
    if skipped:
        log.info("%s: skipped %s", path, ", ".join(f"{n} {what}" for what, n in skipped.items()))
    if features and not polygons:
        raise AnnotationError(path, f"no tumour polygon among {len(features)} features "
                                    f"({', '.join(sorted(skipped))}); tumour classes are "
                                    f"{', '.join(rules.tumour_classes)}")
    if not polygons:
        return []
    merged = shapely.union_all(polygons)
    if extent is not None and not merged.intersects(shapely.box(0, 0, *extent)):
        x0, y0, x1, y1 = merged.bounds
        raise AnnotationError(path, f"tumour polygons ({x0:.0f}..{x1:.0f} x {y0:.0f}..{y1:.0f}) "
                                    f"lie outside the slide's level-0 {extent[0]}x{extent[1]} "
                                    "px; are they in level-0 pixels?")
    return [p for p in shapely.get_parts(merged) if isinstance(p, shapely.Polygon)
            and not p.is_empty]


def _polygonal(path: Path, index: int, geometry: dict) -> shapely.Geometry:
    import shapely
    from shapely.geometry import shape

    try:
        polygon = shape(geometry)
    except (ValueError, TypeError, IndexError, AttributeError, KeyError,
            shapely.errors.ShapelyError) as exc:
        raise AnnotationError(path, f"feature {index}: malformed {geometry.get('type')} "
                                    f"coordinates ({one_line(exc)})") from None
    if not np.isfinite(shapely.get_coordinates(polygon)).all():
        raise AnnotationError(path, f"feature {index}: coordinates are not finite numbers")
    if not polygon.is_valid:
        log.warning("%s: feature %d is invalid geometry (%s); repaired with make_valid", path,
                    index, shapely.is_valid_reason(polygon))
        # make_valid may return lines and points beside the polygons (collapsed slivers).
        parts = shapely.get_parts(shapely.make_valid(polygon))
        polygon = shapely.union_all([p for p in parts if p.geom_type in POLYGONAL])
    if polygon.is_empty or polygon.area == 0:
        raise AnnotationError(path, f"feature {index}: polygon has no area")
    return polygon


def tumour_fractions(polygons: list[shapely.Polygon], coords: np.ndarray,
                     step: int) -> np.ndarray:
    """Fraction of each ``step``-px level-0 square at ``coords`` (top-left x, y) that the
    non-overlapping ``polygons`` cover: exact intersection area / square area, float32.

    An STRtree pairs each square only with the polygons whose bounding boxes it meets, so a
    slide of tens of thousands of patches and a few large polygons costs milliseconds.
    """
    import shapely

    coords = np.asarray(coords, np.float64).reshape(-1, 2)
    fractions = np.zeros(len(coords), np.float64)
    if not polygons or not len(coords):
        return fractions.astype(np.float32)
    squares = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + step, coords[:, 1] + step)
    tree = shapely.STRtree(polygons)
    square_index, polygon_index = tree.query(squares, predicate="intersects")
    areas = shapely.area(shapely.intersection(squares[square_index],
                                              np.asarray(polygons)[polygon_index]))
    np.add.at(fractions, square_index, areas)
    # Polygons do not overlap (merged on reading), so the sum is the covered area; the clip
    # only absorbs floating-point rounding at 1.
    return np.clip(fractions / float(step) ** 2, 0.0, 1.0).astype(np.float32)

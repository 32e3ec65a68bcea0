"""The model's opinion as annotations a pathologist can open in QuPath (GeoJSON).

Patches whose tumour probability reaches a threshold are merged into connected regions
(shapely's ``unary_union`` of their level-0 footprints; patches touching at an edge or a
corner join), and each region becomes one QuPath annotation: a GeoJSON Feature with a
Polygon (holes kept) in level-0 pixels, ``objectType: annotation``, a ``Tumor``
classification and, as its measurement, the mean probability of the patches it covers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import box, mapping

from federation.evaluation.heatmap import PatchMap
from formats.atomic import atomic_path

CLASSIFICATION = {"name": "Tumor", "color": [200, 0, 0]}


def tumour_regions(patches: PatchMap, probabilities: np.ndarray,
                   threshold: float) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of the regions of patches with probability ≥ ``threshold``."""
    hot = np.flatnonzero(probabilities >= threshold)
    regions = merged_patches(patches, hot)
    centres = shapely.points(patches.coords[hot] + patches.footprint / 2)
    features = []
    for region in regions:
        inside = shapely.contains(region, centres)
        features.append({
            "type": "Feature",
            "geometry": mapping(region),
            "properties": {"objectType": "annotation", "classification": CLASSIFICATION,
                           "measurements": {
                               "probability": float(probabilities[hot][inside].mean()),
                               "patches": int(inside.sum())}},
        })
    return {"type": "FeatureCollection", "features": features}


def merged_patches(patches: PatchMap, chosen: np.ndarray) -> list[shapely.Polygon]:
    """The connected regions (shapely polygons, level-0 px) that the footprints of patches
    ``chosen`` (indices or a boolean mask) cover."""
    boxes = [box(*b) for b in patches.boxes()[chosen].tolist()]
    merged = shapely.unary_union(boxes) if boxes else shapely.Polygon()
    return list(getattr(merged, "geoms", [merged])) if not merged.is_empty else []


def write_regions(path: str | Path, collection: dict[str, Any]) -> Path:
    """Save a FeatureCollection as GeoJSON, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(collection) + "\n")
    return path

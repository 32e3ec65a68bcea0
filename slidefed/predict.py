"""Diagnose new slides with a saved model: tile, score, aggregate, draw, export.

This is the one module that composes the packages (DESIGN.md): a slide is cut into a temporary
bag by preprocessing's tiler at the tiling settings its model file records (target µm/px, patch
size), an existing bag is read as it is once its settings match, and the engine scores it with
the model's own slide aggregator (``federation.evaluation.aggregation``), so a slide gets the
score ``slidefed evaluate`` gives it. The aggregator and decision threshold are the hospital's
own, from its private decision card beside the model file (``models/<model>.decision``): a
model file alone, e.g. another hospital's proxy, has none. Per slide it writes a heatmap of
patch tumour probabilities over the slide's thumbnail and, when asked, the patches at or above
the decision threshold as QuPath GeoJSON. A slide that cannot be scored is a one-line error and
the others are still scored.
"""

from __future__ import annotations

import csv
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from federation.data.bags import BagIndex, BagReader, index_bag
from federation.devices import resolve_device
from federation.evaluation.aggregation import SlideAggregator, model_aggregator
from federation.evaluation.heatmap import heatmap_title, read_patch_map, write_heatmap
from federation.evaluation.regions import tumour_regions, write_regions
from federation.evaluation.scoring import SCORING_BATCH, scoring_threads
from federation.model_files import decision_threshold, load_model, read_decision
from formats.atomic import atomic_path, make_directory
from formats.errors import one_line
from preprocessing.options import TilingOptions
from preprocessing.tile import tile_slide
from wsi.annotations import read_tumour_annotation
from wsi.resolution import MPP_TOLERANCE
from wsi.slide import open_slide
from wsi.tissue import overview_mpp, read_overview_rgb

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("slide_id", "score", "prediction", "threshold", "n_patches", "model")
BAG_SUFFIX = ".h5"


@dataclass(frozen=True)
class Predictor:
    """A saved model ready to score slides, with the tiling settings it was trained on."""

    path: Path
    module: nn.Module
    aggregator: SlideAggregator
    threshold: float
    target_mpp: float
    patch_size: int

    @property
    def name(self) -> str:
        """How the model is named in outputs: its file's path."""
        return str(self.path)


@dataclass(frozen=True)
class SlidePrediction:
    """One row of ``predictions.csv``."""

    slide_id: str
    score: float
    prediction: int
    threshold: float
    n_patches: int
    model: str


def load_predictor(path: str | Path, device: str = "auto") -> Predictor:
    """The model file at ``path`` on ``device`` (``auto``, ``cpu``, ``cuda``), with the
    threshold and slide aggregator of its hospital's decision card beside it
    (``models/<model>.decision``, ``federation.model_files``)."""
    module, card = load_model(path)
    decision = read_decision(path, card)
    threshold = decision_threshold(path, decision)
    return Predictor(Path(path), module.to(resolve_device(device)),
                     model_aggregator(card, decision), threshold,
                     float(card["data"]["target_mpp"]), int(card["data"]["patch_size"]))


def checked_bag(path: Path, predictor: Predictor) -> BagIndex:
    """The bag at ``path``, refused when it was tiled with other settings than the model."""
    bag = index_bag(path, None)
    if abs(bag.target_mpp - predictor.target_mpp) > MPP_TOLERANCE * predictor.target_mpp \
            or bag.patch_size != predictor.patch_size:
        raise ValueError(f"{path}: bag has {bag.patch_size}-px patches at {bag.target_mpp:g} "
                         f"µm/px but {predictor.path} was trained on {predictor.patch_size}-px "
                         f"patches at {predictor.target_mpp:g} µm/px; re-tile the slide or "
                         "give predict the slide itself")
    return bag


def predict_slides(model: str | Path, inputs: Sequence[str | Path], out_dir: str | Path, *,
                   device: str = "auto", batch_size: int = SCORING_BATCH, workers: int = 1,
                   readers: int | None = None, fill_mpp: float | None = None,
                   annotations: str | Path | None = None,
                   heatmaps: bool = True, geojson: bool = False, progress: bool = True,
                   ) -> tuple[list[SlidePrediction], list[str]]:
    """Score every slide or bag of ``inputs`` with the model file ``model``.

    Writes ``out_dir/predictions.csv`` (:data:`PREDICTION_COLUMNS`), ``heatmaps/<slide>.png``
    and, with ``geojson``, ``regions/<slide>.geojson``. ``annotations`` is one GeoJSON file
    (one input only) or a directory of ``<slide_id>.geojson`` whose tumour polygons the
    heatmaps outline. ``fill_mpp`` is the level-0 µm/px of slides whose files state none.
    ``workers`` processes read and encode a slide's patches when it is tiled; ``readers``
    threads decode the next batches of its bag while the model scores this one (default:
    :func:`~federation.evaluation.scoring.scoring_threads`).
    Returns the predictions and one line per input that failed.
    """
    out_dir = Path(out_dir)
    annotations = None if annotations is None else Path(annotations)
    if annotations is not None and not annotations.is_dir() and len(inputs) > 1:
        raise ValueError(f"{annotations}: one annotation file for {len(inputs)} slides; give a "
                         "directory of <slide_id>.geojson files")
    predictor = load_predictor(model, device)
    reader = BagReader(threads=readers or scoring_threads())
    predictions, errors = [], []
    for source in map(Path, inputs):
        try:
            with tempfile.TemporaryDirectory(prefix="slidefed-predict-") as scratch:
                if source.suffix == BAG_SUFFIX:
                    bag = checked_bag(source, predictor)
                else:
                    options = TilingOptions(target_mpp=predictor.target_mpp,
                                            patch_size=predictor.patch_size, fill_mpp=fill_mpp)
                    tiled = tile_slide(source, Path(scratch) / "slide.h5", options,
                                       workers=workers, progress=progress)
                    bag = index_bag(tiled.bag_path, None)
                predictions.append(_predict_bag(predictor, reader, bag, source, out_dir,
                                                batch_size=batch_size, fill_mpp=fill_mpp,
                                                annotation=_annotation(annotations, bag),
                                                heatmap=heatmaps, geojson=geojson))
        except (ValueError, OSError) as error:
            errors.append(one_line(error))
    if predictions:
        write_predictions(out_dir / "predictions.csv", predictions)
    return predictions, errors


def _predict_bag(predictor: Predictor, reader: BagReader, bag: BagIndex, source: Path,
                 out_dir: Path, *, batch_size: int, fill_mpp: float | None,
                 annotation: Path | None, heatmap: bool, geojson: bool) -> SlidePrediction:
    if not (heatmap or geojson):
        score = predictor.aggregator.score(predictor.module, reader, bag, batch_size=batch_size)
        return SlidePrediction(bag.slide_id, score, int(score >= predictor.threshold),
                               predictor.threshold, bag.n_patches, predictor.name)
    score, probabilities = predictor.aggregator.score_with_probabilities(
        predictor.module, reader, bag, batch_size=batch_size)
    prediction = SlidePrediction(bag.slide_id, score, int(score >= predictor.threshold),
                                 predictor.threshold, bag.n_patches, predictor.name)
    patches = read_patch_map(bag.path)
    if heatmap:
        tumour = [] if annotation is None else read_tumour_annotation(
            annotation, extent=(patches.width, patches.height))
        title = heatmap_title(bag.slide_id, score, prediction.prediction, predictor.threshold,
                              predictor.path.name)
        write_heatmap(out_dir / "heatmaps" / f"{bag.slide_id}.png", patches, probabilities,
                      _thumbnail(source, bag, fill_mpp), title, tumour)
    if geojson:
        write_regions(out_dir / "regions" / f"{bag.slide_id}.geojson",
                      tumour_regions(patches, probabilities, predictor.threshold))
    return prediction


def _annotation(annotations: Path | None, bag: BagIndex) -> Path | None:
    if annotations is None or not annotations.is_dir():
        return annotations
    path = annotations / f"{bag.slide_id}.geojson"
    return path if path.is_file() else None


def _thumbnail(source: Path, bag: BagIndex, fill_mpp: float | None) -> np.ndarray | None:
    """The slide's overview picture: from ``source``, or for a bag from the slide it was cut
    from when that can still be opened (else None, a blank background)."""
    if source.suffix == BAG_SUFFIX:
        import h5py

        with h5py.File(bag.path, "r") as f:
            source = Path(str(f.attrs["source_path"]))
            fill_mpp = float(f.attrs["mpp_level0"])
        if not source.is_file():
            log.warning("%s: slide %s not found; heatmap drawn without its thumbnail",
                        bag.path, source)
            return None
    with open_slide(source, fill_mpp) as slide:
        rgb, _ = read_overview_rgb(slide, overview_mpp(slide.info))
    return rgb


def write_predictions(path: Path, rows: Sequence[SlidePrediction]) -> None:
    """``predictions.csv``, written atomically."""
    make_directory(path.parent)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PREDICTION_COLUMNS)
        for r in rows:
            writer.writerow((r.slide_id, repr(r.score), r.prediction, repr(r.threshold),
                             r.n_patches, r.model))


def table(rows: Sequence[SlidePrediction]) -> str:
    """The predictions as an aligned text table."""
    width = max([len("slide_id"), *(len(r.slide_id) for r in rows)])
    lines = [f"{'slide_id':<{width}}  {'score':>6}  {'diagnosis':<9}  {'threshold':>9}  "
             f"{'patches':>7}"]
    lines += [f"{r.slide_id:<{width}}  {r.score:6.3f}  "
              f"{'tumour' if r.prediction else 'no tumour':<9}  {r.threshold:9.3f}  "
              f"{r.n_patches:7d}" for r in rows]
    return "\n".join(lines)

"""``slidefed evaluate RUN_DIR``: slide-level diagnosis of a finished run, per hospital and pooled.

For each hospital (``data.hospitals`` of the run's ``config.yaml``) this reads the slides of
its ``splits.csv`` from its own bags and scores its validation and test slides with each of
its saved models (``hospitals/<h>/models/*.pt``), using the decision threshold each model
chose on that hospital's validation slides at the end of training, from the hospital's private
decision card (``models/<model>.decision``, ``federation.model_files``). It writes, per
hospital (in that hospital's directory) and for the run:

- ``slide_predictions.csv``: ``hospital, slide_id, split, label, score, prediction, model``;
- ``slide_metrics.json``: for every model name, the test-slide metrics of each hospital and
  of all hospitals' test slides pooled (each slide called with its own hospital's
  threshold), each metric with a bootstrap 95 % interval (``federation.evaluation.metrics``);
- ``cross_site.csv`` (run level, when every hospital is evaluated): every hospital's shared
  models (the proxy, which travels anyway) on every hospital's test slides. Private models
  are scored only at home: they never leave their hospital. Nor does a hospital's decision
  card: at another hospital the proxy gets a threshold chosen there, on that hospital's
  validation slides, and (``slides.aggregation: attention_mil``) a head fitted there, on its
  training slides (``federation.evaluation.aggregation``); top-k pooling needs no fitting.

Every number here is computed on the hospitals' slides and is not covered by DP. The run-level
files pool every hospital's rows; the command writes them only when it evaluates every
hospital, i.e. where one operator may read every hospital's directory (the demo's single
machine). Across real sites, each hospital runs ``slidefed evaluate RUN_DIR --hospital H`` on
its own directory, which writes only its own files, and publishes what it chooses
(``federation.run_files``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from tqdm import tqdm

from federation.config import FederationConfig, load_config
from federation.data.bags import BagIndex, BagReader, index_bag
from federation.data.slides import read_manifest
from federation.data.splits import read_splits
from federation.evaluation.aggregation import (
    SlideAggregator,
    TopK,
    calibrate,
    model_aggregator,
)
from federation.evaluation.metrics import (
    METRICS,
    choose_threshold,
    metrics_with_intervals,
    point_metrics,
)
from federation.evaluation.scoring import scoring_threads
from federation.model_files import decision_threshold, load_model, read_decision
from federation.run_directory import RunDirectory
from federation.run_files import (
    CROSS_SITE,
    CROSS_SITE_KEYS,
    PREDICTION_COLUMNS,
    SLIDE_METRICS,
    SLIDE_PREDICTIONS,
)
from federation.seeds import derive_seed
from formats.atomic import atomic_path

log = logging.getLogger(__name__)

CROSS_SITE_COLUMNS = (*CROSS_SITE_KEYS, *METRICS)
EVALUATED_SPLITS = ("validation", "test")
SPLITS = ("train", *EVALUATED_SPLITS)  # training slides: where a foreign proxy's head is fitted


class EvaluationError(ValueError):
    """A run that cannot be evaluated; ``str()`` is one line naming the file."""


@dataclass(frozen=True)
class SavedModel:
    """One hospital's saved model, loaded."""

    hospital: str
    name: str
    module: nn.Module
    threshold: float
    aggregator: SlideAggregator
    shared: bool


@dataclass(frozen=True)
class Prediction:
    """One row of ``slide_predictions.csv`` (and the threshold that made its call)."""

    hospital: str
    slide_id: str
    split: str
    label: int
    score: float
    prediction: int
    model: str
    threshold: float


def evaluate_run(run_dir: str | Path, hospitals: Sequence[str] | None = None, *,
                 n_bootstrap: int = 1000, progress: bool = True) -> dict[str, Any]:
    """Evaluate ``hospitals`` (default: all) of the run in ``run_dir``; returns the metrics."""
    run_dir = Path(run_dir)
    config, run, chosen = open_run(run_dir, hospitals)
    reader = BagReader(threads=scoring_threads())
    slides = {h: hospital_slides(config, run, h) for h in chosen}
    models = {h: saved_models(run, h) for h in chosen}
    scorer = _Scorer(reader, config)
    bar = tqdm(total=sum(len(m) for m in models.values()), desc="evaluate", unit="model",
               disable=None if progress else True)
    predictions: dict[str, list[Prediction]] = {}
    with bar:
        for hospital in chosen:
            rows = []
            for model in models[hospital]:
                for split in EVALUATED_SPLITS:
                    for bag in slides[hospital][split]:
                        score = scorer.score(model, bag)
                        rows.append(Prediction(hospital, bag.slide_id, split, bag.label, score,
                                               int(score >= model.threshold), model.name,
                                               model.threshold))
                bar.update()
            predictions[hospital] = rows
            directory = run.hospital_dir(hospital)
            _write_predictions(directory / SLIDE_PREDICTIONS, rows)
            _write_json(directory / SLIDE_METRICS,
                        _metrics({hospital: rows}, n_bootstrap, config.seed))
    result = _metrics(predictions, n_bootstrap, config.seed)
    if hospitals is None:
        _write_predictions(run_dir / SLIDE_PREDICTIONS,
                           [row for rows in predictions.values() for row in rows])
        _write_json(run_dir / SLIDE_METRICS, result)
        _write_cross_site(run_dir / CROSS_SITE, models, slides, scorer)
    return result


def open_run(run_dir: Path, hospitals: Sequence[str] | None
             ) -> tuple[FederationConfig, RunDirectory, list[str]]:
    """The config and directory of the slide run in ``run_dir``, and ``hospitals`` (default:
    all of the run's), checked."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise EvaluationError(f"{run_dir}: not a run directory (no config.yaml)")
    config = load_config(config_path)
    if config.data.name != "bags":
        raise EvaluationError(f"{config_path}: data.name is {config.data.name!r}; slide-level "
                              "evaluation needs a run on patch bags")
    chosen = list(config.data.hospitals if hospitals is None else hospitals)
    unknown = sorted(set(chosen) - set(config.data.hospitals))
    if unknown:
        raise EvaluationError(f"{config_path}: no hospital {', '.join(unknown)} in this run")
    return config, RunDirectory(run_dir, is_root=True), chosen


class _Scorer:
    """Slide scores of saved models, each slide scored once per model and aggregator."""

    def __init__(self, reader: BagReader, config: FederationConfig) -> None:
        self.reader = reader
        self.config = config
        self._cache: dict[tuple[str, str, str, Path], float] = {}

    def score(self, model: SavedModel, bag: BagIndex, aggregator: SlideAggregator | None = None,
              where: str | None = None) -> float:
        """``bag``'s score by ``model`` with its own aggregator, or with ``aggregator``
        (fitted at hospital ``where``)."""
        key = (model.hospital, model.name, where or model.hospital, bag.path)
        if key not in self._cache:
            self._cache[key] = (aggregator or model.aggregator).score(model.module, self.reader,
                                                                      bag)
        return self._cache[key]

    def away(self, model: SavedModel, hospital: str, slides: dict[str, list[BagIndex]]
             ) -> tuple[SlideAggregator, float, str]:
        """The aggregator and threshold of a shared ``model`` used at ``hospital``, and where
        its aggregator was fitted: at home its own decision card; elsewhere that hospital's
        own choice, never the model's home threshold: the aggregator fitted on ``hospital``'s
        training slides (top-k: its own, nothing to fit), and the threshold chosen on its
        validation slides."""
        if hospital == model.hospital:
            return model.aggregator, model.threshold, model.hospital
        what = f"{model.hospital}'s {model.name} at {hospital}"
        if isinstance(model.aggregator, TopK):
            validation = slides["validation"]
            scores = [self.score(model, bag) for bag in validation]
            return model.aggregator, choose_threshold([b.label for b in validation], scores,
                                                      what=what), model.hospital
        aggregator, threshold = calibrate(
            self.config.slides, model.module, self.reader, slides["train"],
            slides["validation"], seed=derive_seed(self.config.seed, "aggregation", hospital),
            what=what)
        return aggregator, threshold, hospital


def hospital_slides(config: FederationConfig, run: RunDirectory, hospital: str
                     ) -> dict[str, list[BagIndex]]:
    """The hospital's slides by split, as its ``splits.csv`` recorded them."""
    splits_path = run.hospital_dir(hospital) / "splits.csv"
    if not splits_path.is_file():
        raise EvaluationError(f"{splits_path}: missing; did the run finish?")
    splits = read_splits(splits_path)
    listed = {slide_id: (label, path) for slide_id, label, path in
              read_manifest(Path(config.data.root) / hospital)}
    by_split: dict[str, list[BagIndex]] = {s: [] for s in SPLITS}
    for slide_id, split in splits.items():
        if split not in by_split:
            continue
        if slide_id not in listed:
            raise EvaluationError(f"{splits_path}: slide {slide_id!r} is no longer in "
                                  f"{Path(config.data.root) / hospital / 'manifest.csv'}")
        label, path = listed[slide_id]
        by_split[split].append(index_bag(path, label))
    return by_split


def saved_models(run: RunDirectory, hospital: str) -> list[SavedModel]:
    """The hospital's saved models (``hospitals/<h>/models/*.pt``), loaded, each with the
    hospital's decision card."""
    paths = sorted((run.hospital_dir(hospital) / "models").glob("*.pt"))
    if not paths:
        raise EvaluationError(f"{run.hospital_dir(hospital) / 'models'}: no saved models; did "
                              "the run finish?")
    models = []
    for path in paths:
        module, card = load_model(path)
        decision = read_decision(path, card)
        models.append(SavedModel(hospital, card["model"], module,
                                 decision_threshold(path, decision),
                                 model_aggregator(card, decision), bool(card["shared"])))
    return models


def _metrics(predictions: dict[str, list[Prediction]], n_bootstrap: int, seed: int
             ) -> dict[str, Any]:
    """``{model: {"hospitals": {h: metrics}, "pooled": metrics}}`` on the test slides."""
    result: dict[str, Any] = {}
    names = sorted({row.model for rows in predictions.values() for row in rows})
    for name in names:
        per_hospital = {}
        pooled: list[Prediction] = []
        for hospital, rows in predictions.items():
            test = [r for r in rows if r.model == name and r.split == "test"]
            pooled += test
            per_hospital[hospital] = _summary(test, n_bootstrap, seed)
        result[name] = {"hospitals": per_hospital, "pooled": _summary(pooled, n_bootstrap, seed)}
    return result


def _summary(rows: Sequence[Prediction], n_bootstrap: int, seed: int) -> dict[str, Any]:
    labels = [r.label for r in rows]
    # Pooled slides keep the threshold their own hospital's model chose.
    metrics = metrics_with_intervals(labels, [r.score for r in rows],
                                     [r.threshold for r in rows], n_bootstrap=n_bootstrap,
                                     seed=seed)
    return {"slides": len(rows), "tumour_slides": int(sum(labels)), **metrics}


def _write_cross_site(path: Path, models: dict[str, list[SavedModel]],
                      slides: dict[str, dict[str, list[BagIndex]]], scorer: _Scorer) -> None:
    rows = []
    for owner, saved in models.items():
        for model in (m for m in saved if m.shared):
            for hospital, by_split in slides.items():
                aggregator, threshold, where = scorer.away(model, hospital, by_split)
                test = by_split["test"]
                scores = [scorer.score(model, bag, aggregator, where) for bag in test]
                metrics = point_metrics([b.label for b in test], scores, threshold)
                rows.append({"model_hospital": owner, "model": model.name,
                             "data_hospital": hospital, "slides": len(test), **metrics})
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CROSS_SITE_COLUMNS)
        writer.writeheader()
        writer.writerows({k: _format(v) for k, v in row.items()} for row in rows)


def _write_predictions(path: Path, rows: Iterable[Prediction]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PREDICTION_COLUMNS)
        for r in rows:
            writer.writerow((r.hospital, r.slide_id, r.split, r.label, repr(r.score),
                             r.prediction, r.model))


def _write_json(path: Path, document: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_finite(document), indent=2) + "\n")


def _finite(tree: Any) -> Any:
    """nan (an undefined metric) as JSON null."""
    if isinstance(tree, dict):
        return {k: _finite(v) for k, v in tree.items()}
    if isinstance(tree, float) and math.isnan(tree):
        return None
    return tree


def _format(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def one_line(result: dict[str, Any]) -> str:
    """``private: pooled test AUC 0.93 [0.88, 0.97] (64 slides); proxy: ...``."""
    parts = []
    for name, metrics in result.items():
        auc, pooled = metrics["pooled"]["auc"], metrics["pooled"]
        parts.append(f"{name}: pooled test AUC {auc['value']:.3f} "
                     f"[{auc['low']:.3f}, {auc['high']:.3f}] ({pooled['slides']} slides)")
    return "; ".join(parts) if parts else "no models evaluated"


"""What the results report shows, read from a workflow's output directory.

The directory is laid out as the Snakefile writes it: ``preprocessed/<hospital>/`` holds each
hospital's ``manifest.csv`` and ``qc/<slide_id>.png``; ``federation/<algorithm>/`` each
algorithm's run, after ``slidefed evaluate`` (``slide_metrics.json``, ``slide_predictions.csv``,
``cross_site.csv``) and optionally ``slidefed heatmap`` (``heatmaps.csv``). Only run-level
files are read, the subset the coordinator collects (``federation.run_files``), never a
hospital's own directory except the heatmap PNGs that ``heatmaps.csv`` names. A file that is
missing or malformed is a ``ReportInputError`` naming it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from federation import run_files
from federation.evaluation.metrics import METRICS

PREPROCESSED, FEDERATION = "preprocessed", "federation"
# the manifest columns the report reads (all of formats.hospital_dir.MANIFEST_COLUMNS but
# those it does not show)
MANIFEST_COLUMNS = ("slide_id", "label", "status", "n_patches", "error")

Row = TypeVar("Row")


class ReportInputError(ValueError):
    """An output directory the report cannot read; ``str()`` is one line naming the file."""


@dataclass(frozen=True)
class Failure:
    """A slide that preprocessing could not tile, and why (the manifest's ``error``)."""

    slide_id: str
    error: str


@dataclass(frozen=True)
class Hospital:
    """One hospital's cohort, from its manifest."""

    name: str
    slides: int
    tumour_slides: int
    patches: int
    failures: tuple[Failure, ...]
    qc: tuple[Path, ...]  # the QC pictures of its first tiled slides


@dataclass(frozen=True)
class MetricRow:
    round: int
    client: str  # the hospital's name (metrics.csv numbers clients in data.hospitals order)
    model: str
    split: str
    metric: str
    value: float


@dataclass(frozen=True)
class PrivacyRow:
    round: int
    client: str
    epsilon: float
    delta: float
    unit: str
    relation: str
    guarantee: str


@dataclass(frozen=True)
class Prediction:
    hospital: str
    slide_id: str
    split: str
    label: int
    score: float
    model: str


@dataclass(frozen=True)
class CrossSite:
    model_hospital: str
    model: str
    data_hospital: str
    slides: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class HeatmapRow:
    hospital: str
    model: str
    slide_id: str
    label: int | None
    score: float
    prediction: int
    path: Path


@dataclass(frozen=True)
class Run:
    """One algorithm's evaluated run."""

    algorithm: str  # the run directory's name, as the workflow names it
    directory: Path
    config_text: str
    hospitals: tuple[str, ...]  # data.hospitals: client k is hospitals[k]
    metrics: tuple[MetricRow, ...]
    privacy: tuple[PrivacyRow, ...]
    predictions: tuple[Prediction, ...]
    slide_metrics: dict[str, Any]  # slide_metrics.json
    cross_site: tuple[CrossSite, ...]
    heatmaps: tuple[HeatmapRow, ...]  # empty without heatmaps.csv


@dataclass(frozen=True)
class WorkflowResults:
    output_dir: Path
    hospitals: tuple[Hospital, ...]
    runs: tuple[Run, ...]


def collect(output_dir: str | Path, thumbnails: int = 6,
            runs: Sequence[str] | None = None) -> WorkflowResults:
    """Read the workflow outputs under ``output_dir``, keeping ``thumbnails`` QC pictures per
    hospital: the runs ``federation/<name>`` of ``runs`` (default: every run there; the
    workflow names its algorithms, so a run left by an earlier config is not shown)."""
    output_dir = Path(output_dir)
    manifests = sorted((output_dir / PREPROCESSED).glob("*/manifest.csv"))
    if not manifests:
        raise ReportInputError(f"{output_dir}: no {PREPROCESSED}/<hospital>/manifest.csv; is "
                               "this a workflow's output_dir?")
    if runs is None:
        directories = sorted(p.parent for p in
                             (output_dir / FEDERATION).glob(f"*/{run_files.CONFIG}"))
    else:
        directories = [output_dir / FEDERATION / name for name in runs]
        for d in directories:
            if not (d / run_files.CONFIG).is_file():
                raise ReportInputError(f"{d}: no such run (no {run_files.CONFIG})")
    return WorkflowResults(output_dir, tuple(read_hospital(m, thumbnails) for m in manifests),
                           tuple(read_run(d) for d in directories))


def read_hospital(manifest: Path, thumbnails: int) -> Hospital:
    """A hospital's cohort from its ``manifest.csv`` and the QC pictures beside it."""
    rows = _rows(manifest, MANIFEST_COLUMNS, lambda r: r)
    tiled = [r for r in rows if r["status"] == "ok"]
    qc = [manifest.parent / "qc" / f"{r['slide_id']}.png" for r in tiled]
    return Hospital(
        name=manifest.parent.name, slides=len(rows),
        tumour_slides=sum(r["label"] == "1" for r in rows),
        patches=sum(_integer(r["n_patches"]) for r in tiled),
        failures=tuple(Failure(r["slide_id"], r["error"]) for r in rows if r["status"] != "ok"),
        qc=tuple(p for p in qc if p.is_file())[:thumbnails])


def read_run(directory: Path) -> Run:
    """An evaluated run; ``ReportInputError`` when ``slidefed evaluate`` has not run on it."""
    metrics_path = directory / run_files.SLIDE_METRICS
    if not metrics_path.is_file():
        raise ReportInputError(f"{metrics_path}: missing; run `slidefed evaluate {directory}` "
                               "first")
    try:
        slide_metrics = json.loads(metrics_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReportInputError(f"{metrics_path}: not JSON ({error})") from None
    config_path = directory / run_files.CONFIG
    config_text = config_path.read_text()
    hospitals = _hospitals(config_path, config_text)

    def hospital(client: str) -> str:
        return hospitals[int(client)]

    index = directory / run_files.HEATMAPS
    return Run(
        algorithm=directory.name, directory=directory, config_text=config_text,
        hospitals=hospitals,
        metrics=_rows(directory / run_files.METRICS, run_files.METRICS_COLUMNS,
                      lambda r: MetricRow(int(r["round"]), hospital(r["client"]), r["model"],
                                          r["split"], r["metric"], _number(r["value"]))),
        # runs written before privacy.csv stated its relation and guarantee still load
        privacy=_rows(directory / run_files.PRIVACY, run_files.PRIVACY_COLUMNS[:5],
                      lambda r: PrivacyRow(int(r["round"]), hospital(r["client"]),
                                           _number(r["epsilon"]), _number(r["delta"]),
                                           r["unit"], r.get("relation") or "",
                                           r.get("guarantee") or "")),
        predictions=_rows(directory / run_files.SLIDE_PREDICTIONS, run_files.PREDICTION_COLUMNS,
                          lambda r: Prediction(r["hospital"], r["slide_id"], r["split"],
                                               int(r["label"]), float(r["score"]), r["model"])),
        slide_metrics=slide_metrics,
        cross_site=_rows(directory / run_files.CROSS_SITE, (*run_files.CROSS_SITE_KEYS, *METRICS),
                         lambda r: CrossSite(r["model_hospital"], r["model"], r["data_hospital"],
                                             int(r["slides"]),
                                             {m: _number(r[m]) for m in METRICS})),
        heatmaps=_rows(index, run_files.HEATMAP_COLUMNS, lambda r: HeatmapRow(
            r["hospital"], r["model"], r["slide_id"], int(r["label"]) if r["label"] else None,
            float(r["score"]), int(r["prediction"]), directory / r["path"]))
        if index.is_file() else ())


def _hospitals(path: Path, text: str) -> tuple[str, ...]:
    """``data.hospitals`` of a run's resolved ``config.yaml``."""
    try:
        hospitals = yaml.safe_load(text)["data"]["hospitals"]
    except (yaml.YAMLError, KeyError, TypeError):
        raise ReportInputError(f"{path}: no data.hospitals; not a slide run's config") from None
    if not isinstance(hospitals, list) or not hospitals:
        raise ReportInputError(f"{path}: no data.hospitals; not a slide run's config")
    return tuple(map(str, hospitals))


def _rows(path: Path, columns: Sequence[str], convert: Callable[[dict[str, str]], Row]
          ) -> tuple[Row, ...]:
    """Every row of the CSV at ``path``, converted; a bad value names the file and line."""
    rows = []
    for line, row in run_files.read_rows(path, columns):
        try:
            rows.append(convert(row))
        except (TypeError, ValueError, IndexError) as error:
            raise ReportInputError(f"{path}:{line}: {error}") from None
    return tuple(rows)


def _number(text: str) -> float:
    """A CSV number; empty (undefined) is nan."""
    return float(text) if text else math.nan


def _integer(text: str) -> int:
    return int(text) if text else 0

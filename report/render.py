"""Fill the report's template and write it: ``write_results_report``.

The page is one file: every picture is a ``data:`` URI, the style sheet is inline, and there
is no script and no link to anything outside it, so it opens offline and can be mailed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from federation.evaluation.metrics import METRICS
from federation.privacy.statement import NON_PRIVATE, NOT_SHARED, UNSTATED, epsilon_label
from formats.atomic import atomic_path
from report import figures
from report.collect import CrossSite, Run, WorkflowResults, collect
from report.embed import data_uri, picture_uri
from report.versions import software_versions

REPORT = "report.html"
TEMPLATE = "report.html.j2"
QC_SIDE, HEATMAP_SIDE = 320, 560  # px of the embedded pictures' long side
METRIC_NAMES = {"auc": "AUC", "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
                "sensitivity": "sensitivity", "specificity": "specificity"}


def write_results_report(output_dir: str | Path, out: str | Path | None = None, *,
                         workflow_config: str | None = None, thumbnails: int = 6,
                         runs: Sequence[str] | None = None) -> Path:
    """Write the report of the workflow outputs under ``output_dir`` to ``out`` (default
    ``output_dir/report.html``): the runs ``federation/<name>`` of ``runs`` (default: all),
    ``thumbnails`` QC pictures per hospital and the workflow configuration
    ``workflow_config`` (YAML text) when given. Returns the path."""
    if thumbnails < 0:
        raise ValueError(f"results-report: --thumbnails must be at least 0, got {thumbnails}")
    results = collect(output_dir, thumbnails, runs)
    out = Path(out) if out is not None else Path(output_dir) / REPORT
    environment = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                              autoescape=True, undefined=StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True)
    page = environment.get_template(TEMPLATE).render(
        **context(results), workflow_config=workflow_config, versions=software_versions())
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out


def context(results: WorkflowResults) -> dict[str, Any]:
    """What the template shows, as plain values (text, numbers, data URIs)."""
    hospitals = [h.name for h in results.hospitals]
    runs = results.runs
    return {
        "output_dir": str(results.output_dir),
        "non_private": NON_PRIVATE, "not_shared": NOT_SHARED,
        "metric_names": [METRIC_NAMES[m] for m in METRICS],
        "cohort": [{
            "name": h.name, "slides": h.slides, "tumour_slides": h.tumour_slides,
            "tiled": h.slides - len(h.failures), "patches": h.patches,
            "failures": [{"slide_id": f.slide_id, "error": f.error} for f in h.failures],
            "qc": [{"slide_id": p.stem, "uri": picture_uri(p, QC_SIDE)} for p in h.qc],
        } for h in results.hospitals],
        "runs": [_run(run) for run in runs],
        "roc": data_uri(figures.roc_curves(runs, hospitals)) if runs else None,
        "slide_metrics": _metric_rows(runs, hospitals),
    }


def _run(run: Run) -> dict[str, Any]:
    privacy = figures.privacy_curves(run)
    final: dict[str, float] = {}
    for row in run.privacy:  # in round order: the last row of a hospital is its final ε
        final[row.client] = row.epsilon
    return {
        "algorithm": run.algorithm,
        # What its hospitals shared by opt-in (report.shared_metrics); None: nothing.
        "training": data_uri(figures.training_curves(run)) if run.metrics else None,
        "privacy": data_uri(privacy) if privacy else None,
        "final_epsilon": [{"hospital": h, "epsilon": _number(e)} for h, e in final.items()],
        "unit": " / ".join(sorted({r.unit for r in run.privacy})),
        # what the ε means: a theorem (unit, replace-one) or the DP-SGD steps' ε only
        "statement": " / ".join(sorted({epsilon_label(asdict(r)) if r.guarantee else UNSTATED
                                        for r in run.privacy})),
        "cross_site": _cross_site(run),
        "heatmaps": _heatmaps(run),
        "config": run.config_text,
    }


def _metric_rows(runs: Sequence[Run], hospitals: Sequence[str]) -> list[dict[str, Any]]:
    """The slide-level metrics table: per hospital, then pooled, each algorithm and model."""
    rows = []
    for scope in [*hospitals, figures.POOLED]:
        for run in runs:
            for model, metrics in run.slide_metrics.items():
                summary = metrics["pooled"] if scope == figures.POOLED \
                    else metrics["hospitals"].get(scope)
                if summary is None:
                    continue
                rows.append({"scope": scope, "algorithm": run.algorithm, "model": model,
                             "slides": summary["slides"],
                             "tumour_slides": summary["tumour_slides"],
                             "values": [_interval(summary[m]) for m in METRICS]})
    return rows


def _cross_site(run: Run) -> list[dict[str, Any]]:
    """Per shared model, a matrix: the hospital whose model (rows) on whose test slides
    (columns), AUC and accuracy in each cell."""
    tables = []
    for model in sorted({c.model for c in run.cross_site}):
        cells = {(c.model_hospital, c.data_hospital): c for c in run.cross_site
                 if c.model == model}
        owners = [h for h in run.hospitals if any(k[0] == h for k in cells)]
        data = [h for h in run.hospitals if any(k[1] == h for k in cells)]
        tables.append({"model": model, "columns": data, "rows": [{
            "hospital": owner,
            "cells": [_cell(cells.get((owner, d)), owner == d) for d in data],
        } for owner in owners]})
    return tables


def _cell(row: CrossSite | None, home: bool) -> dict[str, Any]:
    if row is None:
        return {"auc": "—", "accuracy": "—", "slides": 0, "home": home}
    return {"auc": _number(row.metrics["auc"]), "accuracy": _number(row.metrics["accuracy"]),
            "slides": row.slides, "home": home}


def _heatmaps(run: Run) -> list[dict[str, Any]]:
    """Heatmaps by hospital, then slide, each slide's models side by side."""
    grouped: dict[str, dict[str, list[Any]]] = {}
    for row in run.heatmaps:
        grouped.setdefault(row.hospital, {}).setdefault(row.slide_id, []).append(row)
    return [{"hospital": hospital, "slides": [{
        "slide_id": slide_id,
        "label": {None: "unknown", 0: "normal", 1: "tumour"}[rows[0].label],
        "pictures": [{"model": r.model, "uri": picture_uri(r.path, HEATMAP_SIDE),
                      "score": f"{r.score:.3f}",
                      "call": "tumour" if r.prediction else "normal"} for r in rows],
    } for slide_id, rows in slides.items()]} for hospital, slides in grouped.items()]


def _interval(metric: Mapping[str, float | None]) -> dict[str, str]:
    """``{"value": "0.912", "interval": "[0.850, 0.970]"}``; undefined is a dash."""
    value, low, high = metric.get("value"), metric.get("low"), metric.get("high")
    if value is None or math.isnan(value):
        return {"value": "—", "interval": ""}
    return {"value": f"{value:.3f}",
            "interval": "" if low is None or high is None else f"[{low:.3f}, {high:.3f}]"}


def _number(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.3f}"

"""The report's plots, drawn with matplotlib's object API (no pyplot state) as PNG bytes.

Colour tells hospitals (or algorithms) apart and the line style models, so a private and a
proxy curve of one hospital read as a pair.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_auc_score, roc_curve

from report.collect import Prediction, Run

DPI = 100
PANEL_INCHES = (4.2, 3.2)
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "v", "D", "x")
POOLED = "pooled"


def training_curves(run: Run) -> bytes:
    """Each shared metric (``metrics.csv``) against round: a panel per split and metric, a
    line per hospital and model."""
    panels = sorted({(m.split, m.metric) for m in run.metrics})
    models = sorted({m.model for m in run.metrics})
    if not panels:
        figure, (ax,) = _panels(1)
        _empty(ax, "metrics.csv has no rows")
        return _png(figure)
    figure, axes = _panels(len(panels))
    for ax, (split, metric) in zip(axes, panels, strict=True):
        for h, hospital in enumerate(run.hospitals):
            for m, model in enumerate(models):
                rows = [r for r in run.metrics if (r.client, r.model, r.split, r.metric)
                        == (hospital, model, split, metric)]
                if rows:
                    ax.plot([r.round for r in rows], [r.value for r in rows], marker=".",
                            color=_colour(h), linestyle=_style(m), label=f"{hospital} {model}")
        ax.set(title=f"{split} {metric.replace('_', ' ')}", xlabel="round", ylabel=metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_beside(figure, axes)
    return _png(figure)


def privacy_curves(run: Run) -> bytes | None:
    """ε spent by each hospital against round, at the unit ε protects (``privacy.csv``);
    None for a run without DP."""
    if not run.privacy:
        return None
    figure, (ax,) = _panels(1)
    for h, hospital in enumerate(run.hospitals):
        # Hospitals with as many slides spend equal ε: marker and dashes keep each visible.
        rows = [r for r in run.privacy if r.client == hospital]
        ax.plot([r.round for r in rows], [r.epsilon for r in rows], color=_colour(h),
                linestyle=_style(h), marker=MARKERS[h % len(MARKERS)], markersize=4,
                markerfacecolor="none", label=hospital)
    units = " / ".join(sorted({r.unit for r in run.privacy}))
    deltas = ", ".join(f"{d:g}" for d in sorted({r.delta for r in run.privacy}))
    ax.set(title=f"ε per {units} (δ = {deltas})", xlabel="round", ylabel=f"ε ({units})")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_beside(figure, [ax])
    return _png(figure)


def roc_curves(runs: Sequence[Run], hospitals: Sequence[str]) -> bytes:
    """ROC curves on the test slides: a panel per hospital and one of all hospitals pooled,
    a line per algorithm and model, its AUC in the legend."""
    scopes = [*hospitals, POOLED]
    figure, axes = _panels(len(scopes))
    for ax, scope in zip(axes, scopes, strict=True):
        ax.plot([0, 1], [0, 1], color="#bbbbbb", linewidth=0.8)
        drawn = 0
        for r, run in enumerate(runs):
            models = sorted({p.model for p in run.predictions})
            for m, model in enumerate(models):
                test = [p for p in run.predictions if p.model == model and p.split == "test"
                        and scope in (POOLED, p.hospital)]
                curve = _roc(test)
                if curve is not None:
                    fpr, tpr, auc = curve
                    ax.plot(fpr, tpr, color=_colour(r), linestyle=_style(m),
                            label=f"{run.algorithm} {model} (AUC {auc:.2f})")
                    drawn += 1
        ax.set(title=f"{scope} test slides", xlabel="1 − specificity", ylabel="sensitivity",
               xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal")
        if drawn:
            ax.legend(fontsize="small", loc="lower right")
        else:
            _empty(ax, "no ROC: the test slides\nhold one class only")
    return _png(figure)


def _roc(predictions: Sequence[Prediction]) -> tuple[np.ndarray, np.ndarray, float] | None:
    labels = [p.label for p in predictions]
    if len(set(labels)) < 2:
        return None
    scores = [p.score for p in predictions]
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr, float(roc_auc_score(labels, scores))


def _panels(count: int) -> tuple[Figure, list[Axes]]:
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows),
                    layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for ax in axes[count:]:
        ax.set_visible(False)
    return figure, axes[:count]


def _legend_beside(figure: Figure, axes: Sequence[Axes]) -> None:
    """One legend for every panel, right of them: a legend inside would hide the curves of
    many hospitals."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    figure.legend(list(entries.values()), list(entries), loc="outside right upper",
                  fontsize="small")


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666666")


def _colour(index: int) -> str:
    return COLOURS[index % len(COLOURS)]


def _style(index: int) -> str:
    return LINESTYLES[index % len(LINESTYLES)]


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()

"""Slide-level metrics with bootstrap 95 % intervals, and the decision threshold.

Metrics come from scikit-learn: ROC AUC (threshold-free), and at a decision threshold t
(a slide is called tumour when its score ≥ t) accuracy, balanced accuracy, sensitivity
(recall of tumour slides) and specificity (recall of normal slides). Intervals are the
2.5 and 97.5 percentiles of the metric over ``n_bootstrap`` resamples of the slides with
replacement (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13);
resamples in which a metric is undefined (AUC, sensitivity or specificity with one class
missing) are left out of that metric's interval. A metric undefined on the slides
themselves is nan.

The threshold of a model is chosen on its hospital's validation slides by Youden's J
(sensitivity + specificity − 1, Youden, Cancer 1950), the ROC point farthest above chance;
when the validation slides hold one class only, or no cut does better than chance, 0.5 is
used and a warning says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

log = logging.getLogger(__name__)

METRICS = ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity")
FALLBACK_THRESHOLD = 0.5


Thresholds = float | Sequence[float] | np.ndarray


def point_metrics(labels: Sequence[int], scores: Sequence[float], threshold: Thresholds
                  ) -> dict[str, float]:
    """Every metric of ``METRICS`` for slides with 0/1 ``labels`` and ``scores``, called
    tumour at ``threshold`` (one for all slides, or one per slide: pooled hospitals)."""
    y = np.asarray(labels, np.int64)
    s = np.asarray(scores, np.float64)
    predicted = (s >= np.asarray(threshold, np.float64)).astype(np.int64)
    both = len(np.unique(y)) == 2
    nan = float("nan")
    return {
        "auc": float(roc_auc_score(y, s)) if both else nan,
        "accuracy": float(accuracy_score(y, predicted)) if len(y) else nan,
        "balanced_accuracy": float(balanced_accuracy_score(y, predicted)) if both else nan,
        "sensitivity": float(recall_score(y, predicted, pos_label=1, zero_division=np.nan))
        if (y == 1).any() else nan,
        "specificity": float(recall_score(y, predicted, pos_label=0, zero_division=np.nan))
        if (y == 0).any() else nan,
    }


def metrics_with_intervals(labels: Sequence[int], scores: Sequence[float],
                           threshold: Thresholds, *, n_bootstrap: int = 1000, seed: int = 0
                           ) -> dict[str, dict[str, float]]:
    """``{metric: {"value", "low", "high"}}``: each metric and its bootstrap 95 % interval."""
    y = np.asarray(labels, np.int64)
    s = np.asarray(scores, np.float64)
    t = np.broadcast_to(np.asarray(threshold, np.float64), s.shape)
    values = point_metrics(y, s, t)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(y), (n_bootstrap if len(y) else 0, len(y)))
    samples = _resampled_metrics(y[picks], s[picks], s[picks] >= t[picks])
    result = {}
    for metric in METRICS:
        defined = samples[metric][~np.isnan(samples[metric])]
        low, high = (np.percentile(defined, [2.5, 97.5]) if len(defined)
                     else (float("nan"), float("nan")))
        result[metric] = {"value": values[metric], "low": float(low), "high": float(high)}
    return result


def _resampled_metrics(y: np.ndarray, s: np.ndarray, called: np.ndarray
                       ) -> dict[str, np.ndarray]:
    """``METRICS`` of every row of ``(B, n)`` resamples at once (nan where undefined).

    The same definitions as ``point_metrics`` (a test holds them to scikit-learn), in numpy
    over all resamples together: 1,000 resamples of a few hundred slides take milliseconds,
    where a loop over scikit-learn calls takes seconds. AUC is the Mann–Whitney statistic with
    mid-ranks for ties, which is what ``roc_auc_score`` computes.
    """
    positive = y == 1
    n_pos, n_neg = positive.sum(1), (~positive).sum(1)
    ranks = rankdata(s, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * positive).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
        sensitivity = (called & positive).sum(1) / n_pos
        specificity = (~called & ~positive).sum(1) / n_neg
        both = (n_pos > 0) & (n_neg > 0)
        return {
            "auc": np.where(both, auc, np.nan),
            "accuracy": (called == positive).mean(1) if y.shape[1] else np.full(len(y), np.nan),
            "balanced_accuracy": np.where(both, (sensitivity + specificity) / 2, np.nan),
            "sensitivity": np.where(n_pos > 0, sensitivity, np.nan),
            "specificity": np.where(n_neg > 0, specificity, np.nan),
        }


def choose_threshold(labels: Sequence[int], scores: Sequence[float], *, what: str = "") -> float:
    """The score threshold maximising Youden's J on these (validation) slides."""
    y = np.asarray(labels, np.int64)
    if len(np.unique(y)) < 2:
        log.warning("%s: validation slides hold one class only; decision threshold %.2f",
                    what or "threshold", FALLBACK_THRESHOLD)
        return FALLBACK_THRESHOLD
    fpr, tpr, thresholds = roc_curve(y, np.asarray(scores, np.float64))
    best = int(np.argmax(tpr - fpr))
    if tpr[best] - fpr[best] <= 0:  # no cut beats chance (roc_curve's first is +inf)
        log.warning("%s: no threshold separates the validation slides better than chance; "
                    "decision threshold %.2f", what or "threshold", FALLBACK_THRESHOLD)
        return FALLBACK_THRESHOLD
    return float(thresholds[best])

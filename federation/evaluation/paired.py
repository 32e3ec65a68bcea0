"""Paired comparisons of two models on the same test slides: DeLong for AUC, a stratified
paired bootstrap for accuracy, sensitivity and specificity; per hospital and combined within
hospitals. numpy and scipy only (no torch, no scikit-learn), so ``slidefed compare`` starts fast.

Why paired: both models score the *same* slides, so their errors are correlated; comparing two
unpaired intervals (do they overlap?) throws that correlation away and is badly conservative.
Every test here is on the per-slide difference.

AUC: ``delong_paired``
    DeLong, DeLong & Clarke-Pearson, *Biometrics* 44:837-845 (1988), in the fast
    structural-components form of Sun & Xu, *IEEE Signal Processing Letters* 21:1389-1393
    (2014). With m tumour slides X and n normal slides Y, and ψ(x, y) = 1 if x > y, ½ if
    x = y, 0 otherwise, each model's AUC is the Mann–Whitney statistic
    θ = (1/mn) Σ_i Σ_j ψ(X_i, Y_j); its structural components are V10(X_i) = (1/n) Σ_j
    ψ(X_i, Y_j) and V01(Y_j) = (1/m) Σ_i ψ(X_i, Y_j); S10 and S01 are their 2 × 2 sample
    covariance matrices (divisor m − 1 and n − 1) over the two models, and
    Var(θ_A − θ_B) = c'(S10/m + S01/n)c with c = (1, −1). Ties count ½ (mid-ranks), as in
    scikit-learn's ``roc_auc_score``. The 95 % interval is Δ ± 1.96·SE (a Wald interval, not
    truncated to [−1, 1]) and the p-value is two-sided, from the normal approximation. Not
    computable (``None`` with a ``reason``): AUC with one class only; the variance with
    fewer than two slides of a class; interval and p-value when the DeLong variance is 0
    (e.g. both models separate the classes perfectly, AUC 1.0 on a handful of slides: the
    data show no uncertainty, which is not the same as having none), rather than a
    degenerate interval such as [1.000, 1.000].

Across hospitals: ``combine_hospitals``
    Scores of different hospitals are never pooled: a private model is a different model at
    each hospital, and even a shared proxy is called with each hospital's own threshold, so
    one AUC over all hospitals' raw scores would rank slides of one hospital against
    another's and mix calibration differences into discrimination. Instead each hospital's
    Δ_h and DeLong variance v_h are combined, hospitals being independent samples:
    Δ = Σ w_h Δ_h, Var(Δ) = Σ w_h² v_h, with w_h the hospital's share of the test slides.
    The headline AUC of each method is the same slide-weighted mean of its per-hospital
    AUCs, so that Δ = AUC_A − AUC_B overall as in every hospital. It estimates the AUC at
    a hospital drawn in proportion to its test slides (the population the federation
    serves). The alternative "stratified AUC", P(tumour slide outscores a normal slide of the
    same hospital) = Σ m_h n_h AUC_h / Σ m_h n_h (``weighting="pairs"``, the stratified
    Mann–Whitney statistic), weighs a hospital by its number of tumour × normal pairs, i.e.
    favours hospitals whose *test split* happens to be class-balanced; it is reported beside
    the headline, not as it. (Inverse-variance weights would be most efficient but would make
    the estimand depend on the models being compared.) A hospital whose variance cannot be
    estimated (one class, or a single slide of a class) is left out of the combination, the
    weights are renormalised over the others, and the result names it; a hospital with
    variance 0 enters with its Δ and variance 0.

Accuracy, sensitivity, specificity: ``paired_bootstrap``
    At each model's own threshold (the ``prediction`` column: each hospital's calls, made with
    that hospital's threshold). Slides are resampled with replacement within hospital ×
    label strata, the same slides for both models (paired), so every resample keeps each
    hospital's numbers of tumour and normal slides: sensitivity and specificity are always
    defined where they are on the data, and the overall figures, computed from every
    hospital's calls together, are within-hospital combinations (the overall sensitivity is
    the tumour-slide-weighted mean of the hospitals' sensitivities). Calls, unlike scores,
    are comparable across hospitals. The interval is the 2.5 and 97.5 percentiles of the
    resampled differences (Efron & Tibshirani 1993, ch. 13); the p-value is twice the smaller
    share of resampled differences on either side of 0, counting the observed difference
    as one more resample, (1 + #{d* ≤ 0}) / (B + 1) or (1 + #{d* ≥ 0}) / (B + 1), capped at
    1: it is below 0.05 about when 0 is outside the 95 % interval. When every resample
    gives the same difference (the two models' calls disagree on no slide there, or each
    is perfect) the interval and p-value are not computable and say why.

Caveats a reader should keep: the DeLong interval and the percentile bootstrap are
large-sample approximations, unreliable with a few slides of a class per hospital (the
per-hospital figures then mostly show how little a small test split can tell); no
adjustment is made for the several hospitals and metrics compared (they are reported, not
screened); and a run's test slides are one draw, so a difference between two runs also
carries the randomness of their training, which only repeated seeds measure.

Usage (``slidefed compare``, ``federation.evaluation.compare``)::

    slidefed compare results/demo/federation/proxyfl results/demo/federation/fedavg \
        --model private --model-b proxy -o proxyfl_vs_fedavg.json
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.stats import norm, rankdata

Z_95 = float(norm.ppf(0.975))
BOOTSTRAP_METRICS = ("accuracy", "sensitivity", "specificity")
WEIGHTINGS = ("slides", "pairs")


@dataclass(frozen=True)
class DeLong:
    """Two models' AUCs on the same slides and their difference ``delta`` = AUC_A − AUC_B.

    ``None`` marks what is not computable, and ``reason`` says why: the AUCs and delta with
    one class; ``variance`` with fewer than two slides of a class; ``se``, ``low``, ``high``
    and ``p`` also when the variance is 0. ``se_a``/``se_b`` are each AUC's DeLong standard
    error (``None`` where 0 or not estimable).
    """

    positives: int
    negatives: int
    auc_a: float | None
    auc_b: float | None
    delta: float | None
    variance: float | None
    se: float | None
    low: float | None
    high: float | None
    p: float | None
    se_a: float | None = None
    se_b: float | None = None
    reason: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Combined:
    """Per-hospital DeLong results combined: ``delta`` = Σ w_h Δ_h, ``variance`` = Σ w_h² v_h.

    ``auc_a``/``auc_b`` are the same weighted means of the hospitals' AUCs; ``weights`` the
    hospitals' normalised weights; ``left_out`` the hospitals that could not enter, with why.
    """

    weighting: str
    auc_a: float | None
    auc_b: float | None
    delta: float | None
    variance: float | None
    se: float | None
    low: float | None
    high: float | None
    p: float | None
    weights: dict[str, float] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)
    reason: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Difference:
    """A metric of A and of B at their own thresholds, ``delta`` = A − B, and its paired
    bootstrap percentile interval and p-value (``None`` with a ``reason`` when not
    computable)."""

    a: float | None
    b: float | None
    delta: float | None
    low: float | None
    high: float | None
    p: float | None
    reason: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _interval(delta: float, variance: float) -> tuple[float, float, float, float]:
    """SE, the 95 % normal interval and the two-sided p-value of ``delta``."""
    se = math.sqrt(variance)
    return se, delta - Z_95 * se, delta + Z_95 * se, float(2 * norm.sf(abs(delta) / se))


def structural_components(labels: Sequence[int], scores: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUC (k,), V10 (k, m) and V01 (k, n) of ``scores`` (k models × N slides), by mid-ranks.

    Sun & Xu (2014): with T_Z the mid-ranks of all N scores of a model, T_X those of its m
    tumour slides among themselves and T_Y those of its n normal slides,
    V10_i = (T_Z,i − T_X,i) / n and V01_j = 1 − (T_Z,m+j − T_Y,j) / m; AUC = mean V10.
    """
    y = np.asarray(labels)
    s = np.atleast_2d(np.asarray(scores, np.float64))
    positive = y == 1
    pos, neg = s[:, positive], s[:, ~positive]
    m, n = pos.shape[1], neg.shape[1]
    tz = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    v10 = (tz[:, :m] - rankdata(pos, axis=1)) / n
    v01 = 1.0 - (tz[:, m:] - rankdata(neg, axis=1)) / m
    return v10.mean(axis=1), v10, v01


def _constant(values: np.ndarray) -> bool:
    # Placements are multiples of 1/(2n) or 1/(2m): distinct ones differ by far more than this.
    return bool(np.ptp(values) <= 1e-12) if values.size else True


def delong_paired(labels: Sequence[int], scores_a: Sequence[float], scores_b: Sequence[float]
                  ) -> DeLong:
    """DeLong's test of AUC_A = AUC_B on the same slides (``labels`` 0/1, one score each)."""
    y = np.asarray(labels)
    a = np.asarray(scores_a, np.float64)
    b = np.asarray(scores_b, np.float64)
    if not (y.shape == a.shape == b.shape) or y.ndim != 1:
        raise ValueError(f"labels and scores differ in shape: {y.shape}, {a.shape}, {b.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    m, n = int((y == 1).sum()), int((y == 0).sum())
    if m == 0 or n == 0:
        return DeLong(m, n, None, None, None, None, None, None, None, None,
                      reason=f"one class only ({'no tumour' if m == 0 else 'no normal'} slides)")
    auc, v10, v01 = structural_components(y, np.stack([a, b]))
    auc_a, auc_b = float(auc[0]), float(auc[1])
    delta = auc_a - auc_b
    if m < 2 or n < 2:
        return DeLong(m, n, auc_a, auc_b, delta, None, None, None, None, None,
                      reason="DeLong variance needs at least 2 tumour and 2 normal slides")
    s10, s01 = np.cov(v10), np.cov(v01)
    s = s10 / m + s01 / n
    # Zero exactly when the placements' differences are constant: computed so, not from the
    # floating-point sum, which leaves ~1e-17 where the answer is 0.
    zero_delta = _constant(v10[0] - v10[1]) and _constant(v01[0] - v01[1])
    variance = 0.0 if zero_delta else max(float(s[0, 0] + s[1, 1] - 2 * s[0, 1]), 0.0)
    se_a, se_b = (None if _constant(v10[k]) and _constant(v01[k]) else math.sqrt(s[k, k])
                  for k in (0, 1))
    if variance == 0.0:
        why = ("both AUCs 1.0" if auc_a == auc_b == 1.0 else
               "the two models rank the slides alike" if delta == 0 else
               "the difference's placements are constant")
        return DeLong(m, n, auc_a, auc_b, delta, 0.0, None, None, None, None, se_a, se_b,
                      reason=f"DeLong variance 0 ({why}); interval not computable")
    se, low, high, p = _interval(delta, variance)
    return DeLong(m, n, auc_a, auc_b, delta, variance, se, low, high, p, se_a, se_b)


def combine_hospitals(results: Mapping[str, DeLong], weighting: str = "slides") -> Combined:
    """Per-hospital ``delong_paired`` results combined within hospitals (module docstring).

    ``weighting``: ``"slides"`` (w_h ∝ the hospital's test slides: the headline) or
    ``"pairs"`` (w_h ∝ m_h·n_h: the stratified Mann–Whitney AUC).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, not {weighting!r}")
    left_out = {h: r.reason or "" for h, r in results.items() if r.variance is None}
    kept = {h: r for h, r in results.items() if r.variance is not None}
    nothing = (None,) * 8
    if not kept:
        return Combined(weighting, *nothing, left_out=left_out,
                        reason="no hospital with a DeLong variance")
    raw = {h: float(r.positives + r.negatives if weighting == "slides"
                    else r.positives * r.negatives) for h, r in kept.items()}
    total = sum(raw.values())
    weights = {h: w / total for h, w in raw.items()}
    auc_a = sum(weights[h] * r.auc_a for h, r in kept.items())
    auc_b = sum(weights[h] * r.auc_b for h, r in kept.items())
    delta = sum(weights[h] * r.delta for h, r in kept.items())
    variance = sum(weights[h] ** 2 * r.variance for h, r in kept.items())
    if variance == 0.0:
        return Combined(weighting, auc_a, auc_b, delta, 0.0, None, None, None, None, weights,
                        left_out, reason="DeLong variance 0 in every hospital combined; "
                                         "interval not computable")
    se, low, high, p = _interval(delta, variance)
    return Combined(weighting, auc_a, auc_b, delta, variance, se, low, high, p, weights,
                    left_out)


def bootstrap_p(differences: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "no difference": twice the smaller tail at 0, with the
    observed difference counted as one more resample, capped at 1."""
    b = len(differences)
    below = 1 + int((differences <= 0).sum())
    above = 1 + int((differences >= 0).sum())
    return min(1.0, 2 * min(below, above) / (b + 1))


def paired_bootstrap(hospitals: Sequence[str], labels: Sequence[int], calls_a: Sequence[int],
                     calls_b: Sequence[int], *, n_bootstrap: int = 2000, seed: int = 0
                     ) -> dict[str, dict[str, Difference]]:
    """``{hospital or "overall": {metric: Difference}}`` for ``BOOTSTRAP_METRICS``.

    Slides (one per position of the four sequences) are resampled within hospital × label
    strata, the same resample for both models; ``calls_a``/``calls_b`` are each model's 0/1
    calls at its own threshold. Hospitals are drawn in sorted order from one
    ``numpy.random.default_rng(seed)``, so a result is reproducible from its seed.
    """
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be at least 1, not {n_bootstrap}")
    h = np.asarray(hospitals, dtype=object)
    y = np.asarray(labels)
    ca = np.asarray(calls_a)
    cb = np.asarray(calls_b)
    if not (h.shape == y.shape == ca.shape == cb.shape) or y.ndim != 1:
        raise ValueError("hospitals, labels and calls differ in length")
    for name, values in (("labels", y), ("calls", ca), ("calls", cb)):
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"{name} must be 0 or 1")
    rng = np.random.default_rng(seed)
    # Per scope, per resample: correct calls among tumour slides and among normal slides,
    # for A and B. Row 0 is the data itself; rows 1.. the resamples.
    counts: dict[str, dict[str, np.ndarray]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for hospital in sorted(set(h.tolist())):
        mine = h == hospital
        scope = {}
        for label, key in ((1, "tp"), (0, "tn")):
            index = np.flatnonzero(mine & (y == label))
            right_a = (ca[index] == label).astype(np.int64)
            right_b = (cb[index] == label).astype(np.int64)
            draws = rng.integers(0, len(index), (n_bootstrap, len(index)))
            scope[f"{key}_a"] = np.concatenate([[right_a.sum()], right_a[draws].sum(axis=1)])
            scope[f"{key}_b"] = np.concatenate([[right_b.sum()], right_b[draws].sum(axis=1)])
        counts[hospital] = scope
        sizes[hospital] = (int((mine & (y == 1)).sum()), int((mine & (y == 0)).sum()))
    counts["overall"] = {key: sum(c[key] for c in counts.values()) for key in
                         ("tp_a", "tp_b", "tn_a", "tn_b")}
    sizes["overall"] = (int((y == 1).sum()), int((y == 0).sum()))
    return {scope: _differences(counts[scope], *sizes[scope]) for scope in counts}


def _differences(c: Mapping[str, np.ndarray], m: int, n: int) -> dict[str, Difference]:
    rates = {
        "accuracy": (c["tp_a"] + c["tn_a"], c["tp_b"] + c["tn_b"], m + n, "slides"),
        "sensitivity": (c["tp_a"], c["tp_b"], m, "tumour slides"),
        "specificity": (c["tn_a"], c["tn_b"], n, "normal slides"),
    }
    result = {}
    for metric, (right_a, right_b, total, what) in rates.items():
        if total == 0:
            result[metric] = Difference(None, None, None, None, None, None, reason=f"no {what}")
            continue
        a, b = right_a / total, right_b / total
        d = a - b
        observed, resampled = float(d[0]), d[1:]
        if _constant(resampled):
            why = ("the two models' calls differ on no " + what.removesuffix("s")
                   if observed == 0 else "every resample gives the same difference")
            result[metric] = Difference(float(a[0]), float(b[0]), observed, None, None, None,
                                        reason=f"{why}; interval not computable")
            continue
        low, high = np.percentile(resampled, [2.5, 97.5])
        result[metric] = Difference(float(a[0]), float(b[0]), observed, float(low),
                                    float(high), bootstrap_p(resampled))
    return result

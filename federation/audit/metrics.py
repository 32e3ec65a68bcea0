"""A membership-inference attack's scores -> AUC, TPR at low FPR, and a lower bound on ε.

Scores are the attack's confidence that a record was a member (the loss attack's score is
minus the record's loss). The metrics:

- AUC and the ROC curve (scikit-learn), and TPR at FPR 0.1 % and 1 %: the largest TPR on
  the curve at an FPR no higher than the target, the low-FPR regime that Carlini et al.,
  "Membership inference attacks from first principles", IEEE S&P 2022, argue decides whether
  an attack can confidently identify anyone.
- An empirical lower bound on ε (Jagielski, Ullman & Oprea, "Auditing differentially
  private machine learning", NeurIPS 2020; Nasr et al., "Tight auditing of differentially
  private machine learning", USENIX Security 2023). An (ε, δ)-DP training algorithm bounds
  every membership test by TPR ≤ e^ε FPR + δ and, for its complement, 1 − FPR ≤
  e^ε (1 − TPR) + δ. With one-sided Clopper–Pearson bounds TPR_lo and FPR_hi, each at
  confidence 1 − (1 − c)/2 so that both hold together with confidence c (Bonferroni),

      ε_lb = max(0, log((TPR_lo − δ) / FPR_hi), log((1 − FPR_hi − δ) / (1 − TPR_lo)))

  holds with confidence c — if each record's guess is a Bernoulli trial of its own.

What is and is not proved. The threshold is chosen on one half of the members and
non-members (the one maximising ε_lb there) and the counts are taken on the other half, so
the bound is not inflated by picking the best of many thresholds on the data it is reported
on. The records of one run are not independent trials: one training run audits all of
them at once. Steinke, Nasr & Jagielski, "Privacy auditing with one (1) training run",
NeurIPS 2023, show that when members are chosen at random from a pool, one run's guesses
obey a binomial tail bound of this kind (with a δ correction); here members and
non-members are drawn from one pool with the same label distribution, but the draw is the
partition's, not a per-record coin, so ε_lb is an audit statistic to hold against the
accountant's ε, not a proof. A value above the accountant's ε on a DP model means a bug or
a broken assumption (e.g. a teacher trained without DP on the same records).

The power of the audit. With M members and N non-members in the half the bound is counted
on, no attack can prove more than ``epsilon_lb_max(M, N, δ)``: the bound of a perfect attack
that flags every member and no non-member (100 against 100 at δ = 1e-5: 3.28; 10 against
10: 0.81). An accountant ε above it cannot be contradicted by this audit whatever the model
leaks, so every result is reported beside it. ``federation.audit.canaries`` is the audit
with power at realistic ε (white-box gradient canaries, one run, many canaries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta
from sklearn.metrics import roc_auc_score, roc_curve

LOW_FPRS = (0.001, 0.01)
CONFIDENCE = 0.95


def clopper_pearson_lower(successes: np.ndarray | int, trials: int, alpha: float
                          ) -> np.ndarray:
    """One-sided lower Clopper–Pearson bound on a binomial proportion: the p below which
    ``successes`` or more of ``trials`` has probability at most ``alpha`` (0 when none)."""
    k = np.asarray(successes, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(alpha, k, trials - k + 1)
    return np.where(k == 0, 0.0, bound)


def clopper_pearson_upper(successes: np.ndarray | int, trials: int, alpha: float
                          ) -> np.ndarray:
    """One-sided upper Clopper–Pearson bound: the p above which ``successes`` or fewer of
    ``trials`` has probability at most ``alpha`` (1 when all)."""
    k = np.asarray(successes, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(1 - alpha, k + 1, trials - k)
    return np.where(k == trials, 1.0, bound)


def epsilon_lower_bound(true_positives: np.ndarray | int, members: int,
                        false_positives: np.ndarray | int, nonmembers: int, delta: float,
                        confidence: float = CONFIDENCE) -> np.ndarray:
    """ε_lb of the module docstring for a test that flags ``true_positives`` of ``members``
    and ``false_positives`` of ``nonmembers``; elementwise over arrays of counts."""
    alpha = (1 - confidence) / 2
    tpr_lo = clopper_pearson_lower(true_positives, members, alpha)
    fpr_hi = clopper_pearson_upper(false_positives, nonmembers, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        direct = np.log(np.maximum(tpr_lo - delta, 0.0) / fpr_hi)
        complement = np.log(np.maximum(1 - fpr_hi - delta, 0.0) / (1 - tpr_lo))
    return np.maximum(np.maximum(direct, complement), 0.0)


def epsilon_lb_max(members: int, nonmembers: int, delta: float,
                   confidence: float = CONFIDENCE) -> float:
    """The largest ε_lb that ``epsilon_lower_bound`` can give with ``members`` members and
    ``nonmembers`` non-members: that of a perfect attack, all members flagged and no
    non-member, at the same confidence and δ. It grows with the counts (as log of the
    count, roughly): an accountant ε above it is out of the audit's reach."""
    return float(epsilon_lower_bound(members, members, 0, nonmembers, delta, confidence))


def _counts_at(thresholds: np.ndarray, member_scores: np.ndarray,
               nonmember_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Members and non-members with a score at or above each threshold."""
    members, nonmembers = np.sort(member_scores), np.sort(nonmember_scores)
    tp = len(members) - np.searchsorted(members, thresholds, side="left")
    fp = len(nonmembers) - np.searchsorted(nonmembers, thresholds, side="left")
    return tp, fp


@dataclass(frozen=True)
class EpsilonBound:
    """ε_lb at the threshold chosen on the other half, with the counts it rests on."""

    epsilon_lb: float
    threshold: float
    true_positives: int
    members: int
    false_positives: int
    nonmembers: int


def split_epsilon_bound(member_scores: np.ndarray, nonmember_scores: np.ndarray,
                        delta: float, rng: np.random.Generator,
                        confidence: float = CONFIDENCE) -> EpsilonBound:
    """Choose the threshold that maximises ε_lb on a random half of the members and of the
    non-members; ε_lb of the other halves at that threshold."""
    def halves(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = rng.permutation(len(scores))
        return scores[order[: len(scores) // 2]], scores[order[len(scores) // 2:]]

    (choose_in, bound_in), (choose_out, bound_out) = halves(member_scores), halves(
        nonmember_scores)
    candidates = np.unique(np.concatenate([choose_in, choose_out]))
    tp, fp = _counts_at(candidates, choose_in, choose_out)
    chosen = epsilon_lower_bound(tp, len(choose_in), fp, len(choose_out), delta, confidence)
    threshold = float(candidates[int(np.argmax(chosen))])
    tp, fp = _counts_at(np.array([threshold]), bound_in, bound_out)
    bound = epsilon_lower_bound(tp, len(bound_in), fp, len(bound_out), delta, confidence)
    return EpsilonBound(float(bound[0]), threshold, int(tp[0]), len(bound_in), int(fp[0]),
                        len(bound_out))


@dataclass(frozen=True)
class AttackResult:
    """What one attack achieved on one model; ``epsilon_lb_max`` is the largest ε_lb any
    attack could have reached with the records ``bound`` counted (``epsilon_lb_max``)."""

    auc: float
    tpr_at_fpr: dict[float, float]  # low FPR -> TPR
    bound: EpsilonBound
    roc: tuple[np.ndarray, np.ndarray]  # fpr, tpr
    epsilon_lb_max: float


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The highest TPR of the ROC curve ``(fpr, tpr)`` at an FPR no higher than ``target``."""
    allowed = fpr <= target
    return float(tpr[allowed].max()) if allowed.any() else 0.0


def score_attack(member_scores: np.ndarray, nonmember_scores: np.ndarray, *, delta: float,
                 seed: int, confidence: float = CONFIDENCE) -> AttackResult:
    """AUC, TPR at ``LOW_FPRS`` (on all records), ε_lb (``split_epsilon_bound``) and the
    largest ε_lb attainable with those counts (``epsilon_lb_max``) of an attack that gave
    members ``member_scores`` and non-members ``nonmember_scores``."""
    member_scores = np.asarray(member_scores, dtype=np.float64)
    nonmember_scores = np.asarray(nonmember_scores, dtype=np.float64)
    if len(member_scores) < 2 or len(nonmember_scores) < 2:
        raise ValueError("an audit needs at least two members and two non-members")
    if not (math.isfinite(member_scores.sum()) and math.isfinite(nonmember_scores.sum())):
        raise ValueError("attack scores must be finite")
    truth = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    scores = np.concatenate([member_scores, nonmember_scores])
    fpr, tpr, _ = roc_curve(truth, scores)
    bound = split_epsilon_bound(member_scores, nonmember_scores, delta,
                                np.random.default_rng(seed), confidence)
    return AttackResult(float(roc_auc_score(truth, scores)),
                        {target: tpr_at_fpr(fpr, tpr, target) for target in LOW_FPRS},
                        bound, (fpr, tpr),
                        epsilon_lb_max(bound.members, bound.nonmembers, delta, confidence))

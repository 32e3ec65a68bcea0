"""A white-box, one-run canary audit of DP-SGD: an ε lower bound with power at realistic ε.

The loss attack of ``federation.audit.run`` looks at a finished model with a few hundred
records, so the largest bound it can prove is 2–3 (``metrics.epsilon_lb_max``): it cannot
contradict an accountant's ε of 13, nor notice a mechanism that adds far too little noise.
This audit looks at DP-SGD itself, step by step, with a thousand canaries in one run.

Method. Steinke, Nasr & Jagielski, "Privacy auditing with one (1) training run", NeurIPS
2023 (arXiv 2305.08846), with the gradient ("Dirac") canaries of Nasr, Hayes, Steinke,
Balle, Tramèr, Jagielski, Carlini & Terzis, "Tight auditing of differentially private
machine learning", USENIX Security 2023 (arXiv 2302.07956):

1. m canaries, each a gradient vector C·e_j — norm C, one coordinate each — on a
   coordinate chosen by the auditor (``audit_dp_sgd``'s ``coordinates``; best where the
   data's gradients are zero, such as the weights of an input pixel that is blank in every
   image, so that the data add nothing to a canary's score). Each canary is independently a
   member with probability 1/2 (a seeded generator: the audit is repeatable).
2. Every DP-SGD step samples each member canary with the training's own Poisson rate q, as
   it samples a record, and adds its gradient to the clipped sum before the noise is added.
   A canary is then one more privacy unit of norm ≤ C sampled at rate q: the step is the
   sampled Gaussian mechanism the accountant charges for, canaries included, so a correct
   mechanism is (ε, δ)-DP in each canary with the ε that ``training.epsilon()`` reports.
3. The auditor sees what every step releases, the noisy sum Σ clip(g_i) + N(0, σ²C²I)
   (white box: the sequence of released gradients, hence of released models, not only the
   last). A canary's score is the sum over steps of its coordinate of the release
   (⟨release, e_j⟩: Nasr et al.'s statistic for Dirac canaries).
4. The k highest scores are guessed members, the k lowest non-members, the rest abstain
   (k fixed before the run; ``guesses``). With r = 2k guesses of which v are right, the
   bound is the largest ε that an (ε, δ)-DP mechanism makes this unlikely. Steinke et al.'s
   main theorem for approximate DP (Theorem 3 of arXiv 2305.08846v1, in the p-value form
   that their Appendix D evaluates) bounds, over the canaries' coin flips, the number W of
   correct guesses:

       P[W ≥ v] ≤ P[Bin(r, p) ≥ v] + 2mδ · max_{i=1..v} P[v − i ≤ Bin(r, p) < v] / i,
       p = e^ε / (1 + e^ε),

   and ε_lb is the largest ε at which this p-value is below 1 − confidence (0.95:
   ``metrics.CONFIDENCE``). ``one_run_epsilon_lb`` computes it; it reproduces the two
   values the paper prints (m = 1000, r = 100, v = 75, δ = 1e-4: 0.673; m = 10⁵, r = 1510,
   v = 1439, δ = 1e-5: 2.675; ``tests/federation/test_audit_canaries.py``). With all r guesses right
   it gives the most this audit can show (``epsilon_lb_max``: 4.17 for m = 1000, r = 200,
   δ = 1e-5), which is reported beside every result, as in ``slidefed audit``.

``audit_dp_sgd`` runs the gradient-canary audit on a ``PrivateTraining``;
``audit_record_canaries`` scores canary *records* (already in the training data, members
chosen by the caller) by the projection of every release on a direction per canary, for
mechanisms whose leak is not a gradient, e.g. a teacher trained without DP. A noise
"adversary" (``known_noise``) may subtract what it believes each step's noise was, e.g.
noise regenerated from a known seed (``regenerated_noise``).

Threat model. The auditor is the strongest adversary DP-SGD's guarantee is stated
against: it inserts the canaries (it chooses their gradients and knows which are members),
and it sees every privatized gradient the mechanism releases, each step's noisy sum. It
does not see the mechanism's secret randomness (the Poisson coins and the noise, drawn from
``federation.privacy.randomness``), nor the data's clipped sum. The canaries enter between
``PrivateTraining.backward`` and the noise, through the optimizer's ``add_noise``
(wrapped on the optimizer instance for the duration of the audit: ``privacy.py`` is not
changed); the records of the training and its accounting are otherwise untouched, so the
audit tests the mechanism that runs: its noise, its stream, its accountant.

What the result proves. If the mechanism is (ε, δ)-DP with the accountant's ε, the
probability that ε_lb exceeds it is at most 1 − confidence (5 %), whatever the data, the
model or the canaries. So ε_lb above the claimed ε is evidence, at that confidence, that the
implementation or its accounting is broken: too little noise, noise an observer can
predict (from a known seed), a sampling rate other than the accounted one, or a release
that depends on a record through more than its own clipped gradient (a teacher trained
without DP). What it does not prove: ε_lb below the claimed ε does not show the guarantee
holds. The one-run bound is loose by design (the tests' correct mechanism, accountant ε
1.79, gets ε_lb 0–0.3, and ε_lb cannot exceed ``epsilon_lb_max``); this attack is one
statistic of many; and it sees only the releases, so a leak outside them (the key in a
checkpoint, a side channel, floating-point attacks on the noise sampler) is out of its
view. A canary in a coordinate the data also move is still sound, only weaker.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.stats import binom

from federation.audit.metrics import CONFIDENCE
from federation.privacy.training import PrivateTraining

if TYPE_CHECKING:
    from federation.privacy.randomness import SecretStream

# per-sample loss of the given units (one row per unit), as PrivateTraining.backward takes it
UnitLoss = Callable[[list[int]], torch.Tensor]
# what an adversary believes the step's noise was, flat in optimizer.params order
NoiseGuess = Callable[[PrivateTraining], torch.Tensor]

_EPSILON_CEILING = 100.0


def one_run_p_value(canaries: int, guesses: int, correct: int, epsilon: float,
                    delta: float) -> float:
    """The probability bound of Steinke et al. (module docstring) that ``correct`` or more
    of ``guesses`` guesses about ``canaries`` canaries are right under (ε, δ)-DP."""
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {correct}, "
                         f"{guesses}, {canaries}")
    if correct == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(correct - 1, guesses, p))  # P[Bin(r, p) >= v]
    # P[v - i <= Bin(r, p) < v] for i = 1..v, divided by i
    below = np.cumsum(binom.pmf(np.arange(correct - 1, -1, -1), guesses, p))
    alpha = float(np.max(below / np.arange(1, correct + 1)))
    return min(tail + 2 * canaries * delta * alpha, 1.0)


def one_run_epsilon_lb(canaries: int, guesses: int, correct: int, delta: float,
                       confidence: float = CONFIDENCE) -> float:
    """The largest ε whose p-value (``one_run_p_value``) for ``correct`` right guesses of
    ``guesses`` is below 1 − ``confidence``: an (ε, δ) lower bound at that confidence
    (0 when even ε = 0 explains the count). Bisection to 1e-9; the p-value grows with ε."""
    level = 1.0 - confidence
    if one_run_p_value(canaries, guesses, correct, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while one_run_p_value(canaries, guesses, correct, high, delta) < level:
        low, high = high, 2 * high
        if high > _EPSILON_CEILING:
            return math.inf
    while high - low > 1e-9:
        middle = (low + high) / 2
        if one_run_p_value(canaries, guesses, correct, middle, delta) < level:
            low = middle
        else:
            high = middle
    return low


def one_run_epsilon_lb_max(canaries: int, guesses: int, delta: float,
                           confidence: float = CONFIDENCE) -> float:
    """The most this audit can show with ``canaries`` canaries and ``guesses`` guesses: the
    bound when every guess is right."""
    return one_run_epsilon_lb(canaries, guesses, guesses, delta, confidence)


@dataclass(frozen=True)
class CanaryAudit:
    """One run's one-run canary audit against the accountant's claim."""

    epsilon_lb: float
    epsilon_lb_max: float  # with every guess right: the audit's power
    correct: int
    guesses: int
    canaries: int
    steps: int
    claimed_epsilon: float  # training.epsilon() after the audited steps
    delta: float
    confidence: float

    @property
    def contradicts_claim(self) -> bool:
        """ε_lb above the accountant's ε: a broken mechanism or accounting (at the
        confidence of the bound)."""
        return self.epsilon_lb > self.claimed_epsilon

    def summary(self) -> str:
        return (f"canary audit: epsilon_lb {self.epsilon_lb:.2f} of at most "
                f"{self.epsilon_lb_max:.2f} ({self.correct}/{self.guesses} guesses right, "
                f"{self.canaries} canaries, {self.steps} steps, delta {self.delta:g}, "
                f"confidence {self.confidence:g}); accountant epsilon "
                f"{self.claimed_epsilon:.3g}")


def score_guesses(scores: np.ndarray, members: np.ndarray, guesses: int | None = None
                  ) -> tuple[int, int]:
    """(correct, r): guess the ``guesses // 2`` highest ``scores`` members and as many lowest
    non-members (default r = m / 5), abstain on the rest; count the right guesses."""
    scores, members = np.asarray(scores, dtype=np.float64), np.asarray(members, dtype=bool)
    if scores.shape != members.shape or scores.ndim != 1:
        raise ValueError("one score and one membership bit per canary")
    if not np.isfinite(scores).all():
        raise ValueError("canary scores must be finite")
    half = (len(scores) // 10) if guesses is None else guesses // 2
    if not 0 < 2 * half <= len(scores):
        raise ValueError(f"{guesses} guesses for {len(scores)} canaries")
    order = np.argsort(scores, kind="stable")
    correct = int(members[order[-half:]].sum() + (~members[order[:half]]).sum())
    return correct, 2 * half


def evaluate(scores: np.ndarray, members: np.ndarray, *, claimed_epsilon: float,
             delta: float, steps: int, guesses: int | None = None,
             confidence: float = CONFIDENCE) -> CanaryAudit:
    """The ``CanaryAudit`` of canaries with these ``scores`` and true ``members``."""
    correct, r = score_guesses(scores, members, guesses)
    m = len(scores)
    return CanaryAudit(one_run_epsilon_lb(m, r, correct, delta, confidence),
                       one_run_epsilon_lb_max(m, r, delta, confidence), correct, r, m, steps,
                       claimed_epsilon, delta, confidence)


def _unit_batches(training: PrivateTraining) -> Iterator[list[int]]:
    """The training's Poisson batches, epoch after epoch."""
    while True:
        yield from training.batch_sampler


@contextmanager
def _observing(training: PrivateTraining, before: Callable[[list[torch.Tensor]], None],
               after: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Within the block, each step calls ``before`` with the parameters' clipped sums (to
    add to them in place) just before the noise, and ``after`` with the released noisy sum
    (flat, ``optimizer.params`` order) just after it. Wraps the optimizer instance's
    ``add_noise``, whichever it is, and restores it on exit."""
    optimizer = training.optimizer
    had_own = "add_noise" in vars(optimizer)
    noise_step = optimizer.add_noise

    def add_noise() -> None:
        before([p.summed_grad for p in optimizer.params])
        noise_step()
        after(torch.cat([p.grad.detach().reshape(-1) for p in optimizer.params]))

    optimizer.add_noise = add_noise
    try:
        yield
    finally:
        if had_own:
            optimizer.add_noise = noise_step
        else:
            del optimizer.add_noise


def _run(training: PrivateTraining, loss_of_units: UnitLoss, steps: int,
         before: Callable[[list[torch.Tensor]], None], score: Callable[[torch.Tensor], None],
         known_noise: NoiseGuess | None) -> None:
    def after(released: torch.Tensor) -> None:
        if known_noise is not None:
            released = released - known_noise(training).to(released)
        score(released)

    batches = _unit_batches(training)
    with _observing(training, before, after):
        for _ in range(steps):
            training.backward(loss_of_units(next(batches)))
            training.step()


def _flat_offsets(training: PrivateTraining) -> np.ndarray:
    sizes = [p.numel() for p in training.optimizer.params]
    return np.concatenate([[0], np.cumsum(sizes)])


def audit_dp_sgd(training: PrivateTraining, loss_of_units: UnitLoss, *, steps: int,
                 canaries: int = 1000, coordinates: np.ndarray | None = None, seed: int = 0,
                 guesses: int | None = None, known_noise: NoiseGuess | None = None,
                 confidence: float = CONFIDENCE) -> CanaryAudit:
    """Train ``training`` for ``steps`` DP-SGD steps on its Poisson batches (the loss of a
    batch's units from ``loss_of_units``) with ``canaries`` Dirac gradient canaries, and
    audit it (module docstring).

    ``coordinates``: the canaries' flat parameter indices (``optimizer.params`` order, all
    distinct); default: drawn at random. ``seed`` draws the members and the canaries'
    Poisson coins (the auditor's randomness, not the mechanism's). ``guesses``: r, half
    guessed members, half non-members (default m / 5). ``known_noise``: subtracted from
    every release before scoring (an adversary that can predict the noise).
    The claimed ε is ``training.epsilon()`` after the steps, at ``training.delta``."""
    rng = np.random.default_rng(seed)
    offsets = _flat_offsets(training)
    if coordinates is None:
        coordinates = rng.choice(int(offsets[-1]), size=canaries, replace=False)
    coordinates = np.asarray(coordinates, dtype=np.int64)
    if len(coordinates) != canaries or len(np.unique(coordinates)) != canaries:
        raise ValueError(f"need {canaries} distinct canary coordinates")
    if coordinates.min() < 0 or coordinates.max() >= offsets[-1]:
        raise ValueError(f"canary coordinates must lie in [0, {int(offsets[-1])})")
    members = rng.random(canaries) < 0.5
    clip = training.optimizer.max_grad_norm
    rate = training.sample_rate
    owner = np.searchsorted(offsets, coordinates, side="right") - 1
    local = torch.from_numpy(coordinates - offsets[owner])
    owners = [torch.from_numpy(owner == k) for k in range(len(offsets) - 1)]
    index = torch.from_numpy(coordinates)
    scores = torch.zeros(canaries, dtype=torch.float64)

    def insert(summed: list[torch.Tensor]) -> None:
        # each member canary joins this step with probability q, as a record does
        sampled = torch.from_numpy(members & (rng.random(canaries) < rate))
        for k, grad in enumerate(summed):
            chosen = sampled & owners[k]
            if chosen.any():
                flat = grad.view(-1)
                flat.index_add_(0, local[chosen].to(flat.device),
                                torch.full((int(chosen.sum()),), clip, dtype=flat.dtype,
                                           device=flat.device))

    def score(released: torch.Tensor) -> None:
        scores.add_(released.index_select(0, index.to(released.device)).double().cpu())

    _run(training, loss_of_units, steps, insert, score, known_noise)
    return evaluate(scores.numpy(), members, claimed_epsilon=training.epsilon(),
                    delta=training.delta, steps=steps, guesses=guesses,
                    confidence=confidence)


def audit_record_canaries(training: PrivateTraining, loss_of_units: UnitLoss, *, steps: int,
                          directions: torch.Tensor, members: np.ndarray,
                          guesses: int | None = None, known_noise: NoiseGuess | None = None,
                          confidence: float = CONFIDENCE) -> CanaryAudit:
    """Audit canary records that the caller put in ``training``'s data (``members``: which
    of the m canaries it holds, each chosen with probability 1/2, independently of
    everything else): train ``steps`` steps, score canary j by Σ_t ⟨release_t,
    ``directions[j]``⟩ (``directions``: (m, parameters), flat in ``optimizer.params``
    order; e.g. the direction its own gradient pushes the model), and bound ε as
    ``audit_dp_sgd`` does. Nothing is inserted into the steps."""
    members = np.asarray(members, dtype=bool)
    offsets = _flat_offsets(training)
    if directions.shape != (len(members), int(offsets[-1])):
        raise ValueError(f"directions: expected ({len(members)}, {int(offsets[-1])}), got "
                         f"{tuple(directions.shape)}")
    scores = torch.zeros(len(members), dtype=torch.float64)

    def score(released: torch.Tensor) -> None:
        scores.add_((directions.to(released) @ released).double().cpu())

    _run(training, loss_of_units, steps, lambda summed: None, score, known_noise)
    return evaluate(scores.numpy(), members, claimed_epsilon=training.epsilon(),
                    delta=training.delta, steps=steps, guesses=guesses,
                    confidence=confidence)


def regenerated_noise(stream: SecretStream, noise_multiplier: float, clip: float
                      ) -> NoiseGuess:
    """An adversary that holds ``stream``, a copy of the mechanism's secret stream (e.g.
    rebuilt from a seed it knows), and replays the noise of ``privacy._with_secret_noise``:
    each step, one ``normal("noise", ...)`` draw per parameter in ``optimizer.params``
    order, of standard deviation σ·C. Against a stream with a secret key it guesses noise
    that is independent of the real one."""
    std = noise_multiplier * clip

    def guess(training: PrivateTraining) -> torch.Tensor:
        return torch.cat([
            stream.normal("noise", p.shape, std, dtype=p.dtype, device=p.device).reshape(-1)
            for p in training.optimizer.params])

    return guess

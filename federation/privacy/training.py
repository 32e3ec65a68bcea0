"""Differentially private training of one model of one client: the facade over opacus.

DP-SGD (Abadi et al., "Deep learning with differential privacy", CCS 2016, arXiv
1607.00133): each step draws a Poisson sample of the client's data (every record with
probability q = batch_size / n), clips each record's gradient to L2 norm C, sums, adds
N(0, σ²C²) per coordinate and divides by the expected batch size q·n. Privacy is counted
with the Rényi-DP accountant of the sampled Gaussian mechanism (Mironov, Talwar & Zhang,
arXiv 1908.10530) — opacus' ``RDPAccountant``. In ProxyFL (Kalra et al., Nature
Communications 2023, arXiv 2111.11343) the proxy, the only model that leaves a client, is
trained this way; private models train without DP and do not need this module.

Loss reduction is the mean over the *expected* batch size B = q·n, as in opacus'
``loss_reduction="mean"``: the step's gradient is (Σ_i clip(g_i) + N(0, σ²C²I)) / B, so the
noise on the averaged gradient has standard deviation σ·C/B and the learning rate means the
same as in non-private training. The actual Poisson batch size is not used as the divisor
because it is itself private. Empty Poisson batches are valid steps: they add pure noise and
count towards ε.

The round loop never touches clipping or noise: per batch it calls ``backward(loss_vector)``
and ``step()``; at the end of a round it calls ``epsilon()`` once.

The other rooms of ``federation.privacy``: ``clipping`` (how per-unit clipping is computed,
the mechanisms), ``accounting`` (RDP and the replace-one relation), ``randomness`` (the
secret streams every draw comes from), ``statement`` (what an ε means, in words).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.validators import ModuleValidator
from torch import nn

from federation.config import DPConfig
from federation.privacy.accounting import default_delta, epsilon_from_history
from federation.privacy.clipping import MECHANISMS, Groups
from federation.privacy.randomness import SecretStream

log = logging.getLogger(__name__)

# opacus hooks the first layer, whose input (the data) never requires grad; torch warns
# about that on every backward although the hooks get what they need.
_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to"


def dp_batch_size(requested: int, num_units: int, max_sample_rate: float) -> int:
    """The expected units per DP step for a client with ``num_units``: ``requested``, lowered
    so that q = B / n stays at or below ``max_sample_rate`` (at least one unit per step).
    Subsampling amplifies privacy only while q is well below 1: at q = 1 every step sees
    every unit and the accountant's ε protects little."""
    return max(1, min(requested, num_units, math.floor(max_sample_rate * num_units)))


class PoissonSampler:
    """Poisson sampling of ``num_units`` privacy units from a secret stream: each step every
    unit joins independently with probability ``rate``; an epoch is ⌊1/rate⌋ steps. The
    sampler opacus' ``UniformWithReplacementSampler`` implements and its accountant assumes,
    drawing its coins from ``federation.privacy.randomness`` instead of a seeded generator."""

    def __init__(self, num_units: int, rate: float, secret: SecretStream) -> None:
        self.num_units = num_units
        self.rate = rate
        self.steps = int(1 / rate)
        self._secret = secret

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = self._secret.poisson_mask("sampling", self.num_units, self.rate)
            yield mask.nonzero().reshape(-1).tolist()


def _with_secret_noise(optimizer_class: type[DPOptimizer]) -> type[DPOptimizer]:
    """``optimizer_class`` with its Gaussian noise drawn from the optimizer's ``secret``
    stream; clipping, scaling and the step are opacus' own."""

    def add_noise(self: DPOptimizer) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = self.secret.normal("noise", p.summed_grad.shape, std,
                                       dtype=p.summed_grad.dtype, device=p.summed_grad.device)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    return type(f"SecretNoise{optimizer_class.__name__}", (optimizer_class,),
                {"add_noise": add_noise})


class PrivateTraining:
    """DP-SGD for one model of one client: Poisson sampling, clipping + noise, RDP accounting.

    ``optimizer`` is any torch optimizer over ``model``'s parameters (ProxyFL: Adam); it is
    wrapped, so update through ``step()`` only. Hooks are attached to ``model`` itself (it is
    not wrapped), so its parameters, ``state_dict`` and forward stay as they were; they record
    activations only in training mode with gradients enabled, so a forward whose output is
    used only as a target must run under ``torch.no_grad()``. Put the model on its device
    before building this (the noise generator is created there).

    The Poisson sampling and the noise come from a ``SecretStream`` with a fresh key from the
    operating system's CSPRNG (``label``, e.g. ``"hospital_a/proxy"``, names it in logs), so
    no peer can regenerate them from the shared configuration; ``state_dict`` carries the
    key for the hospital's own resume.

    The client's data are ``num_units`` privacy units (images, or slides); each step takes
    the units of one batch of ``batch_sampler`` (Poisson, q = batch_size / num_units). Per
    batch::

        for units in training.batch_sampler:
            x, y = rows_of(units)
            training.backward(per_sample_loss(model(x), y))   # shape (len(x),)
            training.step()

    then once per round ``training.epsilon()``; before a round of s steps,
    ``training.fits_budget(s)`` says whether it may run.

    For slide-level DP, ``num_units`` and ``batch_size`` count slides (the sampler draws
    slides; ``batch_size`` is the expected slides per step, which divides the noisy sum),
    and each batch's patches come with their slide index:
    ``training.backward(per_sample_loss(model(x), y), groups=slide_of_patch)``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        num_units: int,
        batch_size: int,
        settings: DPConfig,
        label: str,
    ) -> None:
        n = num_units
        if not 0 < batch_size <= n:
            raise ValueError(f"PrivateTraining: batch_size {batch_size} not in [1, {n}] records")
        ModuleValidator.validate(model, strict=True)
        self.model = model
        self.settings = settings
        self.sample_rate = batch_size / n
        self.expected_batch_size = batch_size
        self.delta = settings.delta if settings.delta is not None else default_delta(n)
        if self.delta > 1.0 / (10 * n):
            log.warning("%s: delta %.3g is above 1/(10 n) = %.3g for its n = %d units: a weak "
                        "guarantee (leave dp.delta unset for min(1e-5, 1/(10 n)))",
                        label, self.delta, 1 / (10 * n), n)
        if self.sample_rate > settings.max_sample_rate:
            log.warning("%s: sampling rate q = %.3g (B = %d of n = %d units) is above "
                        "dp.max_sample_rate %.3g: subsampling barely amplifies privacy",
                        label, self.sample_rate, batch_size, n, settings.max_sample_rate)

        # Sampling and noise draw from this model's secret stream (federation.privacy.randomness),
        # never from the run's seed, which every peer knows.
        self._secret = SecretStream.fresh(label)
        self.batch_sampler = PoissonSampler(n, self.sample_rate, self._secret)

        self._mechanism = MECHANISMS[settings.mechanism]
        self._clipping = self._mechanism.attach(model, settings.max_grad_norm)
        optimizer_class = _with_secret_noise(get_optimizer_class(
            clipping="flat", distributed=False, grad_sample_mode=self._mechanism.optimizer_mode
        ))
        self.optimizer: DPOptimizer = optimizer_class(
            optimizer,
            noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            expected_batch_size=batch_size,
            loss_reduction="mean",
        )
        self.optimizer.secret = self._secret
        self._accountant = RDPAccountant()
        self.optimizer.attach_step_hook(
            self._accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate)
        )
        self._epsilon_cache: tuple[int, float] = (0, 0.0)
        log.info(
            "DP-SGD (%s): q=%.4g (B=%d of n=%d), sigma=%g, C=%g, delta=%.3g",
            settings.mechanism,
            self.sample_rate,
            batch_size,
            n,
            settings.noise_multiplier,
            settings.max_grad_norm,
            self.delta,
        )

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on each coordinate of the step's mean gradient."""
        return (
            self.settings.noise_multiplier * self.settings.max_grad_norm / self.expected_batch_size
        )

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """What the accountant was fed: opacus' [(σ, q, steps), ...], DP-SGD steps and
        releases (``release_sum``) alike."""
        return list(self._accountant.history)

    @property
    def steps_taken(self) -> int:
        """DP steps (and releases, ``record_release``) counted by the accountant so far."""
        return sum(steps for _, _, steps in self._accountant.history)

    def release_sum(self, total: torch.Tensor, clip_norm: float) -> torch.Tensor:
        """``total`` + N(0, (σ·``clip_norm``)²) per coordinate, from this model's secret stream,
        charged to its accountant: the Gaussian mechanism (Dwork & Roth 2014, §3.5) on a sum
        over all units whose terms are each clipped to norm ``clip_norm`` — in RDP one step of
        the sampled Gaussian mechanism at q = 1 (Mironov 2017, Proposition 7), composed with
        the DP-SGD steps into the ε this model reports. σ is ``settings.noise_multiplier``."""
        sigma = self.settings.noise_multiplier
        noise = self._secret.normal("release", total.shape, sigma * clip_norm,
                                    dtype=total.dtype, device=total.device)
        self._accountant.history.append((sigma, 1.0, 1))
        return total + noise

    def backward(self, per_sample_loss: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        """Clipped gradients of ``per_sample_loss`` (one entry per batch row, any loss: CE,
        or ProxyFL's DML loss) summed into the model's ``.grad``, ready for ``step()``.

        ``groups`` None: each row is a record, clipped alone. Otherwise an int64 tensor of
        the same length giving each row's privacy unit (its slide) as 0..S-1, each value used
        at least once: each unit's *summed* gradient Σ_{i∈s} ∇loss_i is clipped to C
        (user-level DP, McMahan et al., arXiv 1710.06963), and the step's noise and its
        divisor, ``expected_batch_size``, are then in units (expected slides per step).
        Each entry must depend on its own unit's rows only (its own row, without groups),
        and on this model's parameters only through this model (detach other models'
        outputs); within a slide, rows may interact (e.g. pooling over its patches)."""
        if per_sample_loss.dim() != 1:
            raise ValueError(
                f"PrivateTraining.backward: expected a per-sample loss vector, "
                f"got shape {tuple(per_sample_loss.shape)}"
            )
        units = None
        if groups is not None:
            units = Groups(groups, len(per_sample_loss), per_sample_loss.device)
            if not (units.trivial or self._mechanism.clips_groups):
                alternatives = [name for name, m in MECHANISMS.items() if m.clips_groups]
                raise ValueError(
                    f"mechanism {self.settings.mechanism!r} clips each row alone and cannot "
                    f"clip groups of rows; use {' or '.join(map(repr, alternatives))}"
                )
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_HOOK_WARNING, category=UserWarning)
            self._mechanism.backward(self._clipping, self.optimizer, per_sample_loss, units)

    def step(self) -> None:
        """Add the Gaussian noise, take the optimizer step and count it for privacy."""
        self.optimizer.step()

    def epsilon(self) -> float:
        """ε spent so far at ``self.delta`` (RDP accountant); call once per round."""
        steps = self.steps_taken
        if self._epsilon_cache[0] != steps:
            self._epsilon_cache = (
                steps,
                epsilon_from_history(self._accountant.history, self.delta),
            )
        return self._epsilon_cache[1]

    def epsilon_after(self, steps: int) -> float:
        """ε at ``self.delta`` once ``steps`` more steps are taken, without taking them: σ and
        q are fixed, so what a round will spend is known before it starts."""
        history = [*self._accountant.history,
                   (self.settings.noise_multiplier, self.sample_rate, steps)]
        return epsilon_from_history(history, self.delta)

    def fits_budget(self, steps: int) -> bool:
        """True unless ``steps`` more steps would take ε past ``settings.epsilon_budget``."""
        budget = self.settings.epsilon_budget
        return budget is None or self.epsilon_after(steps) <= budget

    def state_dict(self) -> dict[str, Any]:
        """Accountant history and the secret stream (its key and position), so a resumed run
        neither forgets spent ε nor repeats its noise. The key is secret: this belongs in the
        hospital's own checkpoint only. (Model and optimizer states are checkpointed by their
        owners.)"""
        return {"accountant": self._accountant.state_dict(), "secret": self._secret.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved."""
        if "secret" not in state:
            raise ValueError("this checkpoint was written by a slidefed whose DP noise came "
                             "from the run's seed, which every peer knows; start the run "
                             "afresh (--force)")
        self._accountant.load_state_dict(state["accountant"])
        self._secret.load_state_dict(state["secret"])
        self._epsilon_cache = (0, 0.0)

    def close(self) -> None:
        """Remove the mechanism's hooks from the model (e.g. before training it without DP)."""
        self._clipping.cleanup()

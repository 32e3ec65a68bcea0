"""Shared by the privacy tests: small models and data, the DP-SGD builder, and the
brute-force clipped gradient that every clipping mechanism must reproduce."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from federation.config import DPConfig
from federation.privacy.randomness import fixed_secrets_for_tests
from federation.privacy.training import PrivateTraining

# per-row loss of the given rows of the batch, computed with the given model
RowLoss = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def images(n: int, seed: int, shape: tuple[int, ...] = (1, 28, 28)) -> TensorDataset:
    rng = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, *shape, generator=rng), torch.randint(0, 10, (n,), generator=rng)
    )


def small_gn_cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
    )


def dml_loss(logits: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """ProxyFL's proxy loss per sample: 0.5·CE + 0.5·KL(teacher ‖ model)."""
    ce = F.cross_entropy(logits, y, reduction="none")
    kl = F.kl_div(
        F.log_softmax(logits, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none"
    )
    return 0.5 * ce + 0.5 * kl.sum(-1)


def flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def unit_grads(model: nn.Module, row_loss: RowLoss, groups: torch.Tensor) -> torch.Tensor:
    """Brute force: for each unit s, the gradient of Σ_{i∈s} loss_i from a backward of that
    unit's rows alone; (S, parameters). ``groups = arange(N)``: per-record gradients."""
    grads = []
    for unit in range(int(groups.max()) + 1):
        model.zero_grad()
        row_loss(model, (groups == unit).nonzero().flatten()).sum().backward()
        grads.append(flat_grad(model).clone())
    model.zero_grad()
    return torch.stack(grads)


def clipped_sum(grads: torch.Tensor, clip: float) -> torch.Tensor:
    """Σ_s min(1, C/(‖G_s‖ + 1e-6))·G_s, opacus' clipping formula, over the rows of grads."""
    factors = (clip / (grads.norm(dim=1) + 1e-6)).clamp(max=1.0)
    return (factors[:, None] * grads).sum(0)


def private_training(
    model: nn.Module,
    dataset: TensorDataset,
    *,
    mechanism: str = "bookkeeping",
    sigma: float = 0.0,
    clip: float = 1.0,
    batch_size: int = 8,
    secret_seed: int | None = 0,
    budget: float | None = None,
    delta: float | None = 1e-5,
    lr: float = 0.0,
) -> PrivateTraining:
    """DP-SGD of ``model`` over the records of ``dataset`` (``poisson_batches`` reads them).

    ``secret_seed``: its sampling and noise are keyed by this test seed
    (``fixed_secrets_for_tests``), so a test can repeat them; None: a fresh secret key, as
    in a run."""
    settings = DPConfig(
        noise_multiplier=sigma,
        max_grad_norm=clip,
        mechanism=mechanism,
        epsilon_budget=budget,
        delta=delta,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    secrets = nullcontext() if secret_seed is None else fixed_secrets_for_tests(secret_seed)
    with secrets:
        training = PrivateTraining(model, optimizer, num_units=len(dataset),
                                   batch_size=batch_size, settings=settings, label="test")
    _DATASETS[training] = dataset
    return training


# The records each PrivateTraining made here samples from.
_DATASETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def poisson_batches(training: PrivateTraining) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``training``'s Poisson batches of its records, as (x, y)."""
    inputs, labels = _DATASETS[training].tensors
    for units in training.batch_sampler:
        index = torch.as_tensor(units, dtype=torch.int64)
        yield inputs[index], labels[index]

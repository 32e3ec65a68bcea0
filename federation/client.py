"""What one client holds and how it trains: its data, its models, and the local training steps
that every algorithm shares.

A client owns one or more ``LocalModel`` s (``private``, ``proxy``, ``shared``), each with its
own optimizer, batch order and, for a model that leaves the client, its DP-SGD
(``federation.privacy.training.PrivateTraining``). The two local training procedures live here once:

- ``train_cross_entropy``: plain local epochs of one model.
- ``train_mutual``: deep mutual learning of two models, each on its own batches (Zhang, Xiang,
  Hospedales & Lu, "Deep Mutual Learning", CVPR 2018, arXiv 1706.00384), with the loss
  ``(1 − w)·CE(f(x), y) + w·KL(g(x).detach() ‖ f(x))`` for each model f and its peer g. ProxyFL
  (private ↔ proxy, Kalra et al., Nat Commun 2023, arXiv 2111.11343, Algorithm 1) and FML
  (local ↔ meme, Shen et al., arXiv 2006.16765) both use it.

Random choices that no privacy guarantee rests on (initial weights, the batch order of a
model without DP, which patches of a slide a step reads) come from ``derive_seed(run seed,
purpose, ..., client)`` (numpy ``SeedSequence``), so a client draws the same numbers
whichever process runs it. The draws DP rests on — which units a DP step samples and its
noise — come from the model's secret stream (``federation.privacy.randomness``), never from
the seed.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from federation import catalog
from federation.config import DPConfig, FederationConfig
from federation.data import Batch, ClientData
from federation.models import create_model, load_pretrained
from federation.privacy.training import PrivateTraining, dp_batch_size
from federation.seeds import derive_seed
from federation.transport.flat import FlatParameters

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[nn.Parameter], float, float], torch.optim.Optimizer]


def adam(params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Adam:
    """``optim.name: adam``: Adam with L2 weight decay (ProxyFL's optimizer)."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def sgd(params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.SGD:
    """``optim.name: sgd``: plain SGD with L2 weight decay."""
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


OPTIMIZERS = catalog.OPTIMIZERS  # name -> OptimizerFactory


# ---------------------------------------------------------------------------- models


class LocalModel:
    """One model of one client with its optimizer, its batch order and, when the model leaves
    the client, its DP-SGD.

    ``flat`` binds the parameters to one buffer (what the communicator moves). Without DP the
    model trains on shuffled passes over its client's data (``ClientData.epoch``); with DP on
    the Poisson-sampled privacy units of ``PrivateTraining.batch_sampler``
    (``ClientData.sampled``), and ``epsilon()`` reports what it has spent.
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        data: ClientData,
        *,
        optimizer: OptimizerFactory,
        lr: float,
        weight_decay: float,
        batch_size: int,
        seed: int,
        dp: DPConfig | None,
        label: str,
    ) -> None:
        self.name = name
        self.module = module
        self.data = data
        self.device = next(module.parameters()).device
        self.flat = FlatParameters(module, name)
        self.optimizer = optimizer(module.parameters(), lr, weight_decay)
        self.batch_size = (min(batch_size, data.num_units) if dp is None
                           else dp_batch_size(batch_size, data.num_units, dp.max_sample_rate))
        if dp is not None and self.batch_size < batch_size:
            log.info("%s: %d expected units per DP step (optim.batch_size %d), so that its "
                     "sampling rate stays at or below dp.max_sample_rate %g of its %d units",
                     label, self.batch_size, batch_size, dp.max_sample_rate, data.num_units)
        self._order = torch.Generator().manual_seed(seed)
        self.privacy = (
            None
            if dp is None
            else PrivateTraining(module, self.optimizer, num_units=data.num_units,
                                 batch_size=self.batch_size, settings=dp, label=label)
        )

    @property
    def is_private(self) -> bool:
        """True when the model trains with DP-SGD (it is allowed to leave the client)."""
        return self.privacy is not None

    def epsilon_after(self, epochs: int) -> float:
        """ε once ``epochs`` more epochs are trained (one DP step per Poisson batch, empty
        ones included); 0 for a model trained without DP."""
        return 0.0 if self.privacy is None else self.privacy.epsilon_after(self._steps(epochs))

    def fits_budget(self, epochs: int) -> bool:
        """False for a DP model whose ε would pass its budget in ``epochs`` more epochs: it
        must not train any more."""
        return self.privacy is None or self.privacy.fits_budget(self._steps(epochs))

    def _steps(self, epochs: int) -> int:
        return epochs * len(self.privacy.batch_sampler)

    def batches(self) -> Iterator[Batch]:
        """One epoch of training batches, on the model's device: Poisson-sampled units with
        DP, else a shuffled pass."""
        if self.privacy is not None:
            batches = self.data.sampled(self.privacy.batch_sampler, self._order)
        else:
            batches = self.data.epoch(self.batch_size, self._order)
        for batch in batches:
            yield Batch(*(None if t is None else t.to(self.device) for t in batch))

    def step(self, per_sample_loss: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        """One update from a per-row loss vector: DP-SGD for a DP model (each privacy unit of
        ``groups`` clipped as one record), else plain. An empty Poisson batch is still a DP
        step (pure noise, as the accountant assumes); an empty batch of another model is none."""
        if self.privacy is not None:
            if groups is not None:
                # Each unit's loss is the mean over its rows, so a slide's clipped gradient is
                # on the scale of one record's and σ·C / B means the same as for images.
                rows = torch.bincount(groups, minlength=1).to(per_sample_loss.dtype)
                per_sample_loss = per_sample_loss / rows[groups]
            self.privacy.backward(per_sample_loss, groups)
            self.privacy.step()
            return
        if not len(per_sample_loss):
            return
        self.optimizer.zero_grad(set_to_none=True)
        per_sample_loss.mean().backward()
        self.optimizer.step()

    def epsilon(self) -> float:
        """ε spent so far (at ``delta``); 0 for a model trained without DP."""
        return 0.0 if self.privacy is None else self.privacy.epsilon()

    @property
    def delta(self) -> float | None:
        return None if self.privacy is None else self.privacy.delta

    def evaluate(self) -> dict[str, float]:
        """The metrics of this model on its client's held-out split."""
        return self.data.evaluate(self.module)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue this model exactly."""
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "order": self._order.get_state(),
            "privacy": None if self.privacy is None else self.privacy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Copies into the existing parameters, which stay bound to the flat buffer.
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._order.set_state(state["order"])
        if self.privacy is not None:
            self.privacy.load_state_dict(state["privacy"])


@dataclass(frozen=True)
class ModelRole:
    """How an algorithm uses one of its models.

    ``architecture``: which key of the config's ``model`` section builds it ("private" or
    "proxy"). ``leaves_client``: its parameters (or gradients) are shared, so it trains with
    DP-SGD when ``dp.enabled``. ``common_init``: all clients start from the same weights
    (drawn from the run seed), as model averaging assumes; otherwise each client draws its own.
    ``released``: the model never travels during training but is published after it, so it
    trains with DP-SGD too (``regular_dp``).
    """

    architecture: str
    leaves_client: bool
    common_init: bool
    released: bool = False

    @property
    def trains_with_dp(self) -> bool:
        """True when DP-SGD protects this model (given ``dp.enabled``): it is shared or released."""
        return self.leaves_client or self.released


def build_model(
    config: FederationConfig,
    name: str,
    role: ModelRole,
    client: int,
    data: ClientData,
    device: torch.device,
) -> LocalModel:
    """The ``LocalModel`` named ``name`` of ``client`` on ``device``, built as ``role`` says."""
    init_seed = (derive_seed(config.seed, "init", name) if role.common_init
                 else derive_seed(config.seed, "init", name, client))
    module = create_model(
        getattr(config.model, role.architecture),
        num_classes=data.num_classes,
        seed=init_seed,
        **data.model_options(),
    )
    if role.architecture == "private" and config.model.weights is not None:
        load_pretrained(module, config.model.weights)
    module = module.to(device)
    dp = config.dp if role.trains_with_dp and config.dp.enabled else None
    optim = config.optim
    return LocalModel(
        name,
        module,
        data,
        optimizer=OPTIMIZERS[optim.name],
        lr=optim.dp_lr if dp is not None and optim.dp_lr is not None else optim.lr,
        weight_decay=optim.weight_decay,
        batch_size=optim.batch_size,
        seed=derive_seed(config.seed, "training", name, client),
        dp=dp,
        label=f"{config.client_name(client)}/{name}",
    )


@dataclass
class Client:
    """One client: its id, its data and its models by name."""

    id: int
    data: ClientData
    models: dict[str, LocalModel]


# ---------------------------------------------------------------------------- training


def distillation_loss(
    logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor, weight: float
) -> torch.Tensor:
    """Per-sample ``(1 − w)·CE(logits, y) + w·KL(softmax(teacher) ‖ softmax(logits))``.

    The deep-mutual-learning loss (Zhang et al., CVPR 2018, arXiv 1706.00384, eq. 1-2 with
    ProxyFL's weighting, Kalra et al. 2023, eq. 2-3); ``teacher_logits`` must be detached.
    """
    ce = F.cross_entropy(logits, labels, reduction="none")
    kl = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(teacher_logits, dim=1),
                  reduction="none", log_target=True).sum(dim=1)
    return (1.0 - weight) * ce + weight * kl


class _LossMeter:
    """Mean training loss over the records seen."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, per_sample_loss: torch.Tensor) -> None:
        self.total += float(per_sample_loss.detach().sum())
        self.count += per_sample_loss.numel()

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")


def train_cross_entropy(model: LocalModel, epochs: int) -> float:
    """``epochs`` local epochs of ``model`` with cross-entropy; returns the mean training loss."""
    model.module.train()
    meter = _LossMeter()
    for _ in range(epochs):
        for x, y, groups in model.batches():
            loss = F.cross_entropy(model.module(x), y, reduction="none")
            model.step(loss, groups)
            meter.add(loss)
    return meter.mean


def train_mutual(
    first: LocalModel,
    second: LocalModel,
    *,
    first_weight: float,
    second_weight: float,
    epochs: int,
    train_second: bool = True,
) -> dict[str, float]:
    """Deep mutual learning of ``first`` (never DP) and ``second``, each on its own batches.

    ``first`` minimises ``distillation_loss(first(x), y, second(x).detach(), first_weight)``
    on its batches, ``second`` the same with the roles swapped and ``second_weight`` on its
    own, step for step (a model whose epoch has fewer steps stops first). Each model is
    thus taught by the other's predictions on the batch it learns from, as in DML; the batches
    differ because only a DP model must learn from Poisson-sampled units, the ones its
    accountant assumes, while a model without DP learns from ``epoch``'s class-balanced ones,
    as it would alone (ProxyFL's Algorithm 1 shares one Poisson batch, which on slides left
    a private model fewer and less balanced steps than Regular's, and worse at every seed
    tried). Teachers run without gradients, so DP hooks record nothing for them. With
    ``train_second`` False — a DP model past its ε budget — ``second`` only teaches. Returns
    the mean training loss of each trained model by name.
    """
    first.module.train()
    second.module.train()
    meters = {first.name: _LossMeter(), second.name: _LossMeter()}
    pairs = [(first, second, first_weight)] + ([(second, first, second_weight)]
                                               if train_second else [])
    for _ in range(epochs):
        streams = [student.batches() for student, _, _ in pairs]
        for batches in itertools.zip_longest(*streams):
            for (student, teacher, weight), batch in zip(pairs, batches, strict=True):
                if batch is not None:
                    _distil_step(student, teacher, weight, batch, meters[student.name])
    return {name: meter.mean for name, meter in meters.items() if meter.count}


def _distil_step(student: LocalModel, teacher: LocalModel, weight: float, batch: Batch,
                 meter: _LossMeter) -> None:
    x, y, groups = batch
    if weight == 0:  # no distillation term: the student's loss does not involve the teacher
        loss = F.cross_entropy(student.module(x), y, reduction="none")
    else:
        with torch.no_grad():
            teacher_logits = teacher.module(x)
        loss = distillation_loss(student.module(x), y, teacher_logits, weight)
    student.step(loss, groups)
    meter.add(loss)

"""What one client holds and how it trains: its data, its models, and the local training steps
that every algorithm shares.

A client owns one or more ``LocalModel`` s (``private``, ``proxy``, ``shared``), each with its
own optimizer, batch order and, for a model that leaves the client, its DP-SGD
(``federation.privacy.PrivateTraining``). The two local training procedures live here once:

- ``train_cross_entropy``: plain local epochs of one model.
- ``train_mutual``: deep mutual learning of two models on the same batches (Zhang, Xiang,
  Hospedales & Lu, "Deep Mutual Learning", CVPR 2018, arXiv 1706.00384), with the loss
  ``(1 − w)·CE(f(x), y) + w·KL(g(x).detach() ‖ f(x))`` for each model f and its peer g. ProxyFL
  (private ↔ proxy, Kalra et al., Nat Commun 2023, arXiv 2111.11343, Algorithm 1) and FML
  (local ↔ meme, Shen et al., arXiv 2006.16765) both use it.

Every random choice of a client comes from ``derive_seed(run seed, purpose, ..., client)``
(numpy ``SeedSequence``), so a client draws the same numbers whichever process runs it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from federation import catalog
from federation.config import DPConfig, FederationConfig
from federation.data import (
    as_tensor_dataset,
    client_test_indices,
    label_histogram,
    load_images,
    partition,
)
from federation.flat import FlatParameters
from federation.models import create_model
from federation.privacy import PrivateTraining

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
OptimizerFactory = Callable[[Iterable[nn.Parameter], float, float], torch.optim.Optimizer]


def adam(params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Adam:
    """``optim.name: adam``: Adam with L2 weight decay (ProxyFL's optimizer)."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def sgd(params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.SGD:
    """``optim.name: sgd``: plain SGD with L2 weight decay."""
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


OPTIMIZERS = catalog.OPTIMIZERS  # name -> OptimizerFactory

# Test sets are scored in chunks of this many images: one or two forward passes for the
# benchmarks, bounded memory for larger models.
_EVAL_CHUNK = 2048


def derive_seed(seed: int, *purpose: str | int) -> int:
    """A 63-bit seed for ``purpose`` (e.g. ``"init", "proxy", 3``) drawn from the run's seed.

    Strings are hashed with BLAKE2 (not ``hash()``, which differs between processes), so every
    process derives the same seed for the same purpose.
    """
    words = [seed]
    for part in purpose:
        if isinstance(part, str):
            words.append(int.from_bytes(hashlib.blake2b(part.encode(), digest_size=4).digest()))
        else:
            words.append(int(part))
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


# ---------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ClientData:
    """One client's training set and test set, as normalized in-memory tensors."""

    train: TensorDataset
    test: TensorDataset

    @property
    def num_train(self) -> int:
        return len(self.train)


@dataclass(frozen=True)
class DataInfo:
    """What models need to know about the data: classes, channels, image side."""

    num_classes: int
    in_channels: int
    image_size: int


def load_client_data(
    config: FederationConfig, clients: Iterable[int]
) -> tuple[dict[int, ClientData], DataInfo]:
    """Partition the data set over ``config.clients`` clients and build the data of ``clients``.

    Every process computes the whole partition (cheap, and the same everywhere because it is
    seeded from the run seed alone) and materializes tensors only for the clients it runs.
    Each client's test set follows its training label distribution (``client_test_indices``),
    or with ``data.test_distribution: global`` the test split's.
    """
    spec = config.data
    train = load_images(spec.name, spec.root, train=True)
    test = load_images(spec.name, spec.root, train=False)
    scheme_options: dict[str, dict[str, float]] = {
        "class_skew": {"p_major": spec.p_major},
        "dirichlet": {"alpha": spec.alpha},
    }
    options = scheme_options.get(spec.partition, {})
    rng = np.random.default_rng(derive_seed(config.seed, "partition"))
    parts = partition(train.labels, config.clients, spec.partition, spec.samples_per_client,
                      rng, **options)
    histogram = label_histogram(train.labels, parts, train.num_classes)
    test_distributions = histogram
    if spec.test_distribution == "global":
        frequencies = np.bincount(test.labels, minlength=test.num_classes)
        test_distributions = np.tile(frequencies, (config.clients, 1))
    test_rng = np.random.default_rng(derive_seed(config.seed, "test"))
    tests = client_test_indices(test.labels, test_distributions, spec.test_samples_per_client,
                                test_rng)
    for client, counts in enumerate(histogram):
        log.debug("client %d: %d training images, classes %s", client, counts.sum(),
                  counts.tolist())
    data = {
        c: ClientData(as_tensor_dataset(train, parts[c]), as_tensor_dataset(test, tests[c]))
        for c in clients
    }
    _, channels, height, width = train.images.shape
    if height != width:
        raise ValueError(f"{spec.name}: images are {height}x{width}; models expect square images")
    return data, DataInfo(train.num_classes, channels, height)


# ---------------------------------------------------------------------------- models


class LocalModel:
    """One model of one client with its optimizer, its batch order and, when the model leaves
    the client, its DP-SGD.

    ``flat`` binds the parameters to one buffer (what the communicator moves). Without DP the
    model trains on shuffled minibatches; with DP on the Poisson batches of
    ``PrivateTraining.loader``, and ``epsilon()`` reports what it has spent.
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        train: TensorDataset,
        *,
        optimizer: OptimizerFactory,
        lr: float,
        weight_decay: float,
        batch_size: int,
        seed: int,
        dp: DPConfig | None,
    ) -> None:
        self.name = name
        self.module = module
        self.flat = FlatParameters(module, name)
        self.optimizer = optimizer(module.parameters(), lr, weight_decay)
        self.batch_size = min(batch_size, len(train))
        self._inputs, self._labels = train.tensors
        order_seed, dp_seed = np.random.SeedSequence(seed).generate_state(2)
        self._order = torch.Generator().manual_seed(int(order_seed))
        self.privacy = (
            None
            if dp is None
            else PrivateTraining(module, self.optimizer, train, batch_size=self.batch_size,
                                 settings=dp, seed=int(dp_seed))
        )

    @property
    def is_private(self) -> bool:
        """True when the model trains with DP-SGD (it is allowed to leave the client)."""
        return self.privacy is not None

    @property
    def budget_exhausted(self) -> bool:
        """True once a DP model's ε reached its budget: it must not train any more."""
        return self.privacy is not None and self.privacy.budget_exhausted

    def batches(self) -> Iterator[Batch]:
        """One epoch of training batches: Poisson-sampled with DP, else a shuffled pass."""
        if self.privacy is not None:
            yield from self.privacy.loader
            return
        order = torch.randperm(len(self._labels), generator=self._order)
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            yield self._inputs[index], self._labels[index]

    def step(self, per_sample_loss: torch.Tensor) -> None:
        """One update from a per-sample loss vector: DP-SGD for a DP model, else plain."""
        if self.privacy is not None:
            self.privacy.backward(per_sample_loss)
            self.privacy.step()
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

    @torch.no_grad()
    def evaluate(self, data: TensorDataset) -> dict[str, float]:
        """Accuracy and mean cross-entropy on ``data`` in as few forward passes as fit memory."""
        self.module.eval()
        inputs, labels = data.tensors
        correct, loss = 0, 0.0
        for start in range(0, len(labels), _EVAL_CHUNK):
            x, y = inputs[start:start + _EVAL_CHUNK], labels[start:start + _EVAL_CHUNK]
            logits = self.module(x)
            correct += int((logits.argmax(1) == y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
        self.module.train()
        return {"accuracy": correct / len(labels), "loss": loss / len(labels)}

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
    info: DataInfo,
) -> LocalModel:
    """The ``LocalModel`` named ``name`` of ``client``, built as ``role`` says."""
    init_seed = (derive_seed(config.seed, "init", name) if role.common_init
                 else derive_seed(config.seed, "init", name, client))
    module = create_model(
        getattr(config.model, role.architecture),
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        image_size=info.image_size,
        seed=init_seed,
    )
    dp = config.dp if role.trains_with_dp and config.dp.enabled else None
    return LocalModel(
        name,
        module,
        data.train,
        optimizer=OPTIMIZERS[config.optim.name],
        lr=config.optim.lr,
        weight_decay=config.optim.weight_decay,
        batch_size=config.optim.batch_size,
        seed=derive_seed(config.seed, "training", name, client),
        dp=dp,
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
        for x, y in model.batches():
            loss = F.cross_entropy(model.module(x), y, reduction="none")
            if len(y) or model.is_private:  # an empty Poisson batch is still a (noise) step
                model.step(loss)
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
    """Deep mutual learning of ``first`` (never DP) and ``second`` on the same batches.

    ``first`` minimises ``distillation_loss(first(x), y, second(x).detach(), first_weight)``,
    ``second`` the same with the roles swapped and ``second_weight``. Both losses are computed
    from one forward pass of each model, before either updates. Batches are ``second``'s (the
    Poisson batches its DP accounting assumes) unless ``train_second`` is False — a DP model
    past its ε budget — in which case ``second`` is only a fixed teacher. Returns the mean
    training loss of each trained model by name.
    """
    first.module.train()
    second.module.train()
    meters = {first.name: _LossMeter(), second.name: _LossMeter()}
    source = second if train_second else first
    for _ in range(epochs):
        for x, y in source.batches():
            first_logits = first.module(x)
            if train_second:
                second_logits = second.module(x)
            else:
                # Without gradients the DP hooks record nothing for a model that does not step.
                with torch.no_grad():
                    second_logits = second.module(x)
            first_loss = distillation_loss(first_logits, y, second_logits.detach(), first_weight)
            if len(y):
                first.step(first_loss)
            meters[first.name].add(first_loss)
            if train_second:
                second_loss = distillation_loss(second_logits, y, first_logits.detach(),
                                                second_weight)
                second.step(second_loss)
                meters[second.name].add(second_loss)
    return {name: meter.mean for name, meter in meters.items() if meter.count}

"""The interface every federated algorithm implements, and the mechanisms they share.

Flower-style (``flwr`` strategies): one algorithm, one module, one paper. Each subclass says
which models a client holds (``roles``), which one its results are judged by
(``reported_model``), and what one round does (``run_round``). The mechanisms the papers share
are written once here — local training, mutual learning, mixing with graph neighbours, and
data-weighted averaging — so an algorithm module reads like its update rule.

Algorithms run collectively over the clients this process owns (all of them on the local
backend, a block of them per MPI rank); every call into the communicator is made by every
process in the same order, whatever a client's state, so nothing can hang.

**ε budget.** σ, q and the steps of a round are fixed, so the ε after the next round is known
before it starts. A DP model whose next round would take its ε past ``dp.epsilon_budget``
does not start it: it stops training, once and for all, and the client logs it; its
``privacy()`` status is ``stopped`` from the round after which it trains no more, so ε never
exceeds the budget. A budget below what the first round spends is refused when the
algorithm is built, before any training. A stopped model still takes part in every
exchange, because its peers wait
for a buffer: it sends its current model, which by then holds only parameters already
released (its own last DP update, mixed with what it received from peers) — post-processing,
so it costs no further privacy — and mixes what it receives as before, relaying the others'
updates. In a weighted average it contributes weight zero.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch

from federation import catalog
from federation.algorithms.feature_centre import needs_centre, release_centre
from federation.client import (
    Client,
    ModelRole,
    build_model,
    train_cross_entropy,
    train_mutual,
)
from federation.config import ConfigError, FederationConfig
from federation.data import ClientData
from federation.devices import resolve_device
from federation.privacy.statement import RELATION, STEPS_ONLY, THEOREM
from federation.transport.comm import Communicator
from federation.transport.topology import Topology, make_topology

log = logging.getLogger(__name__)

Losses = dict[int, dict[str, float]]
"""Mean training loss of each model each client trained this round: client -> model -> loss."""


class Spent(NamedTuple):
    """What a client's DP model has spent after a round: (ε, δ); ``status``: ``active``
    while it may train on, ``stopped`` once its next round would pass the ε budget;
    ``relation``: the neighbouring relation ε is stated under; ``guarantee``: whether it is
    a theorem (``federation.privacy.statement.THEOREM``) or the DP-SGD steps' ε only."""

    epsilon: float
    delta: float
    status: str
    relation: str
    guarantee: str


ALGORITHMS = catalog.ALGORITHMS

A = TypeVar("A", bound="type[Algorithm]")


def register_algorithm(name: str) -> Callable[[A], A]:
    """Class decorator adding an ``Algorithm`` subclass outside ``federation.catalog`` (a
    plug-in, a test) to ``ALGORITHMS`` under ``name``, at run time."""

    def decorator(cls: A) -> A:
        ALGORITHMS.add(name, cls)
        return cls

    return decorator


class Stopwatch:
    """Seconds spent per category (training, communication, accounting, evaluation)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, category: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[category] += time.perf_counter() - start


class Algorithm(ABC):
    """One federated algorithm over the clients of ``comm.owned``.

    Found by name in ``federation.catalog.ALGORITHMS``. Class attributes: ``roles`` (model name ->
    ``ModelRole``), ``reported_model`` (the model whose accuracy the paper reports for it).
    At most one role trains with DP (``ModelRole.trains_with_dp``), so each client has one ε.
    """

    roles: ClassVar[dict[str, ModelRole]]
    reported_model: ClassVar[str]
    dp_model_teacher: ClassVar[str | None] = None
    """The model whose predictions the DP model distils from with weight ``dml.beta`` (ProxyFL,
    FML: the private model, trained without DP), or None."""

    @property
    def guarantee(self) -> str:
        """``THEOREM`` unless the DP model distils from a model trained without DP, which
        leaves its ε the DP-SGD steps' only (``federation.config.DMLConfig``)."""
        if self.dp_model_teacher is not None and self.config.dml.beta > 0:
            return STEPS_ONLY
        return THEOREM

    def __init__(
        self,
        config: FederationConfig,
        comm: Communicator,
        data: dict[int, ClientData],
    ) -> None:
        protected = [name for name, role in self.roles.items() if role.trains_with_dp]
        if len(protected) > 1:
            raise TypeError(f"{type(self).__name__}: more than one DP model per client")
        self.config = config
        self.comm = comm
        self.stopwatch = Stopwatch()
        self.device = resolve_device(config.device)
        self.clients = {
            c: Client(c, data[c], {name: build_model(config, name, role, c, data[c],
                                                     self.device)
                                   for name, role in self.roles.items()})
            for c in comm.owned
        }
        self._stopped: set[tuple[int, str]] = set()
        self._check_budget()

    def _check_budget(self) -> None:
        """Refuse an ε budget that not even the first round fits in (the models are fresh)."""
        epochs = self.config.optim.local_epochs
        for c, client in self.clients.items():
            for model in client.models.values():
                if not model.fits_budget(epochs):
                    raise ConfigError(
                        f"dp.epsilon_budget = {self.config.dp.epsilon_budget:g} is below the "
                        f"epsilon of one round ({model.epsilon_after(epochs):.3g} for client "
                        f"{c}'s {model.name}); raise the budget or dp.noise_multiplier")

    def prepare(self) -> None:
        """What models need of the data before the first round of a fresh run (not again on
        resume: a checkpoint holds the result): the feature centre of fixed-feature models
        (``federation.algorithms.feature_centre``), pooled over all clients for a model that
        travels. Collective; its ε is counted before the budget is checked again."""
        for name, role in sorted(self.roles.items()):
            models = {c: client.models[name] for c, client in self.clients.items()}
            if not any(needs_centre(m) for m in models.values()):
                continue
            with self.stopwatch("training"):
                release_centre(models, self.comm if role.leaves_client else None)
        self._check_budget()

    @abstractmethod
    def run_round(self, round: int) -> Losses:
        """Train and communicate for round ``round`` (0-based); the mean training losses."""

    # ------------------------------------------------------------------ shared mechanisms

    def topology(self) -> Topology:
        """The configured communication graph (``topology`` in the config)."""
        return make_topology(self.config.topology, self.comm.size)

    def may_train(self, client: Client, name: str) -> bool:
        """False for a DP model whose next round would pass its ε budget (logged the first
        time)."""
        model = client.models[name]
        if model.fits_budget(self.config.optim.local_epochs):
            return True
        if (client.id, name) not in self._stopped:
            self._stopped.add((client.id, name))
            log.warning(
                "client %d: %s stops at epsilon %.3g, as another round would pass its budget "
                "%.3g; from now on it only passes on parameters already released",
                client.id, name, model.epsilon(), self.config.dp.epsilon_budget,
            )
        return False

    def train_locally(self, name: str, only: Iterable[int] | None = None) -> Losses:
        """``optim.local_epochs`` of cross-entropy training of model ``name`` on each client
        (of ``only``, if given) that may train it."""
        chosen = self.clients.keys() if only is None else set(only) & self.clients.keys()
        losses: Losses = {}
        with self.stopwatch("training"):
            for c in sorted(chosen):
                client = self.clients[c]
                if self.may_train(client, name):
                    model = client.models[name]
                    losses[c] = {name: train_cross_entropy(model, self.config.optim.local_epochs)}
        return losses

    def train_mutually(self, first: str, second: str) -> Losses:
        """Deep mutual learning of ``first`` (weight ``dml.alpha``) and ``second`` (``dml.beta``)
        on every client; ``second`` only teaches once it may no longer train."""
        losses: Losses = {}
        with self.stopwatch("training"):
            for c, client in self.clients.items():
                losses[c] = train_mutual(
                    client.models[first],
                    client.models[second],
                    first_weight=self.config.dml.alpha,
                    second_weight=self.config.dml.beta,
                    epochs=self.config.optim.local_epochs,
                    train_second=self.may_train(client, second),
                )
        return losses

    @torch.no_grad()
    def mix_with_peers(
        self, name: str, round: int, topology: Topology, *, keep_own: bool = True
    ) -> None:
        """Send model ``name`` to this round's out-peers and replace it by the mean of the
        models received (and of itself, with ``keep_own``): push-averaging,
        x_i ← (x_i + Σ_{j→i} x_j) / (1 + |{j→i}|), or with ``keep_own=False`` adoption of the
        received model (cyclic transfer)."""
        outgoing = {c: client.models[name].flat.host() for c, client in self.clients.items()}
        send_to, recv_from = topology.routes(self.comm.owned, round)
        with self.stopwatch("communication"):
            received = self.comm.exchange(outgoing, send_to, recv_from)
        for c, buffers in received.items():
            if not buffers:
                continue
            own = outgoing[c]  # the model's own parameters (on the CPU: updated in place)
            if keep_own:
                for buffer in buffers:
                    own.add_(buffer)
                own.div_(len(buffers) + 1)
            else:
                own.copy_(buffers[0])
                for buffer in buffers[1:]:
                    own.add_(buffer)
                own.div_(len(buffers))
            self.clients[c].models[name].flat.unpack(own)  # a no-op copy for a CPU model

    @torch.no_grad()
    def weighted_average(self, name: str, weights: dict[int, float]) -> None:
        """Replace model ``name`` on every client by Σ_k w_k x_k / Σ_k w_k over all clients,
        in one allreduce of [w_k x_k, w_k]; a client outside the average passes w_k = 0. If
        every weight is zero the models stay as they are."""
        local = {
            c: _with_count(client.models[name].flat.host(), weights[c])
            for c, client in self.clients.items()
        }
        with self.stopwatch("communication"):
            total = self.comm.allreduce_sum(local)
        if total[-1] <= 0:
            log.warning("%s: no client contributed to the average of %s", self.config.algorithm,
                        name)
            return
        average = (total[:-1] / total[-1]).to(torch.float32)
        for client in self.clients.values():
            client.models[name].flat.unpack(average)

    # ------------------------------------------------------------------ the loop's view

    def evaluate(self) -> dict[int, dict[str, dict[str, float]]]:
        """Held-out metrics of every model of every client: client -> model -> metric."""
        with self.stopwatch("evaluation"):
            return {
                c: {name: model.evaluate() for name, model in sorted(client.models.items())}
                for c, client in self.clients.items()
            }

    def privacy(self) -> dict[int, Spent]:
        """What each client's DP model has spent; call once per round. Empty without DP."""
        report = {}
        epochs = self.config.optim.local_epochs
        with self.stopwatch("accounting"):
            for c, client in self.clients.items():
                for model in client.models.values():
                    if model.is_private:
                        status = "active" if model.fits_budget(epochs) else "stopped"
                        report[c] = Spent(model.epsilon(), float(model.delta), status,
                                          RELATION, self.guarantee)
        return report

    def state_dict(self, client: int) -> dict[str, Any]:
        """What a checkpoint holds for ``client``: every model's full training state."""
        return {name: model.state_dict() for name, model in self.clients[client].models.items()}

    def load_state_dict(self, client: int, state: dict[str, Any]) -> None:
        models = self.clients[client].models
        if sorted(state) != sorted(models):
            raise ValueError(
                f"checkpoint of client {client} holds models {sorted(state)}, "
                f"{self.config.algorithm} uses {sorted(models)}"
            )
        for name, model in models.items():
            model.load_state_dict(state[name])


def _with_count(values: torch.Tensor, weight: float) -> torch.Tensor:
    """[weight · values, weight] in float64, ready for an allreduce.

    Every backend sums in client order (``Communicator.allreduce_sum``), so the result is the
    same however the clients are packed; float64 keeps the rounding of a sum over many
    clients far below float32 resolution before the average is cast back.
    """
    return torch.cat([values.to(torch.float64) * weight,
                      torch.tensor([weight], dtype=torch.float64)])

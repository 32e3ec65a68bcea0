"""Communication graphs: who sends to whom in each round, looked up by name.

``exponential`` is the time-varying directed exponential graph that ProxyFL uses (Kalra et al.,
"Decentralized federated learning through proxy model sharing", Nature Communications 2023,
arXiv:2111.11343), taken from Stochastic Gradient Push (Assran et al., ICML 2019,
arXiv:1811.10792): in round t client i sends to one peer, (i + 2^(t mod ceil(log2 K))) mod K,
and receives from (i - 2^(t mod ceil(log2 K))) mod K. Every offset 0..K-1 is a sum of distinct
powers 2^0..2^(ceil(log2 K)-1), so any ceil(log2 K) consecutive rounds carry each client's
model to every other client, while each client talks to only one peer per round.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable

from federation import catalog


class Topology(ABC):
    """A directed communication graph over ``num_clients`` clients that may change per round."""

    def __init__(self, num_clients: int) -> None:
        if num_clients < 1:
            raise ValueError(f"a topology needs at least one client, got num_clients={num_clients}")
        self.num_clients = num_clients

    @abstractmethod
    def peers(self, client: int, round: int) -> tuple[list[int], list[int]]:
        """``(send_to, recv_from)`` of ``client`` in ``round``."""

    def routes(
        self, clients: Iterable[int], round: int
    ) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        """``send_to`` and ``recv_from`` dicts for ``clients``, shaped for
        ``Communicator.exchange``."""
        send_to, recv_from = {}, {}
        for client in clients:
            send_to[client], recv_from[client] = self.peers(client, round)
        return send_to, recv_from

    def _check_client(self, client: int) -> None:
        if not 0 <= client < self.num_clients:
            raise ValueError(f"client {client} is not in 0..{self.num_clients - 1}")


class ExponentialGraph(Topology):
    """ProxyFL's time-varying directed exponential graph (see the module docstring).

    With K=1 there are no peers; with K=2 the two clients swap models every round.
    """

    def __init__(self, num_clients: int) -> None:
        super().__init__(num_clients)
        self.period = math.ceil(math.log2(num_clients)) if num_clients > 1 else 0

    def peers(self, client: int, round: int) -> tuple[list[int], list[int]]:
        self._check_client(client)
        if self.period == 0:
            return [], []
        hop = 2 ** (round % self.period)
        k = self.num_clients
        return [(client + hop) % k], [(client - hop) % k]


class Ring(Topology):
    """A fixed directed ring: client i sends to i+1 and receives from i-1 (mod K)."""

    def peers(self, client: int, round: int) -> tuple[list[int], list[int]]:
        self._check_client(client)
        k = self.num_clients
        if k == 1:
            return [], []
        return [(client + 1) % k], [(client - 1) % k]


class FullyConnected(Topology):
    """Every client sends to and receives from every other client, in ascending id order."""

    def peers(self, client: int, round: int) -> tuple[list[int], list[int]]:
        self._check_client(client)
        others = [c for c in range(self.num_clients) if c != client]
        return others, list(others)


def make_topology(name: str, num_clients: int) -> Topology:
    """The topology ``name`` of ``federation.catalog.TOPOLOGIES`` ("exponential", "ring" or
    "full")."""
    if name not in catalog.TOPOLOGIES:
        choices = sorted(catalog.TOPOLOGIES)
        raise ValueError(f"unknown topology {name!r}; choose one of {choices}")
    return catalog.TOPOLOGIES[name](num_clients)

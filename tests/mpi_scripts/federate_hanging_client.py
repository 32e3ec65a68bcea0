"""Run by tests/federation/test_federate_mpi.py under ``mpiexec``: ``slidefed federate`` in
which client 1 stops answering mid-run.

It registers test-only algorithms, ProxyFL and FedAvg except that in round 2 every client
writes ``<pid> <time>`` to ``$HANG_DIR/client_<c>`` and client 1 then sleeps for an hour
(a hung rank, as a stuck file system or a deadlocked data loader makes one), and hands its
arguments to the real command line, so the hang travels the product's own path.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from federation.algorithms import Losses, register_algorithm
from federation.algorithms.fedavg import FedAvg
from federation.algorithms.proxyfl import ProxyFL
from slidefed.cli import main


def _hang_on_client_1(clients: dict, round: int) -> None:
    if round != 1:
        return
    for c in clients:
        Path(os.environ["HANG_DIR"], f"client_{c}").write_text(f"{os.getpid()} {time.time()}")
    if 1 in clients:
        time.sleep(3600)


@register_algorithm("proxyfl_hanging_on_client_1")
class ProxyFLHangingOnClient1(ProxyFL):
    def run_round(self, round: int) -> Losses:
        _hang_on_client_1(self.clients, round)
        return super().run_round(round)


@register_algorithm("fedavg_hanging_on_client_1")
class FedAvgHangingOnClient1(FedAvg):
    def run_round(self, round: int) -> Losses:
        _hang_on_client_1(self.clients, round)
        return super().run_round(round)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Run by tests/federation/test_comm_mpi.py under ``mpiexec -n R``: one communication scenario
per call.

    python comm_protocol.py protocol OUT.json K exchange/allreduce/broadcast of K clients over
                                                the R ranks; root writes rows
    python comm_protocol.py raise               rank 2 raises while the others wait in MPI calls
    python comm_protocol.py mismatch N          rank 1 sends N elements where rank 0 expects 6
    python comm_protocol.py allreduce-mismatch  rank 1 contributes 7 elements, the others 6
    python comm_protocol.py wrong-size          asks for one client fewer than there are ranks

``protocol`` is also imported by the test and run on the local backend, so both backends
execute the very same algorithm code.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from federation.transport.comm import Communicator, make_communicator, run_guarded
from federation.transport.topology import make_topology

ROUNDS = 3


def client_buffer(client: int, round: int, numel: int = 6) -> torch.Tensor:
    """Values that name their sender and round, so a misrouted buffer is visible."""
    return torch.arange(numel, dtype=torch.float32) + 100 * client + 1000 * round


def protocol(comm: Communicator) -> list[dict]:
    """Exchange over the exponential graph and once over the full graph (several messages
    between each pair of ranks when ranks hold several clients), then an allreduce and a
    broadcast; one row each."""
    topology = make_topology("exponential", comm.size)
    rows: dict[int, list[dict]] = {c: [] for c in comm.owned}
    for round in range(ROUNDS):
        outgoing = {c: client_buffer(c, round) for c in comm.owned}
        send_to, recv_from = topology.routes(comm.owned, round)
        received = comm.exchange(outgoing, send_to, recv_from)
        for c in comm.owned:
            rows[c].append({"op": "exchange", "round": round, "client": c,
                            "value": [b.tolist() for b in received[c]]})
    received = comm.exchange({c: client_buffer(c, ROUNDS) for c in comm.owned},
                             *make_topology("full", comm.size).routes(comm.owned, 0))
    for c in comm.owned:
        rows[c].append({"op": "exchange_full", "client": c,
                        "value": [b.tolist() for b in received[c]]})
    total = comm.allreduce_sum({c: client_buffer(c, 0) for c in comm.owned})
    root_value = comm.broadcast({c: client_buffer(c, 9) for c in comm.owned}, root=comm.size - 1)
    for c in comm.owned:
        rows[c].append({"op": "allreduce", "client": c, "value": total.tolist()})
        rows[c].append({"op": "broadcast", "client": c, "value": root_value.tolist()})
        rows[c].append({"op": "sent", "client": c,
                        "value": [list(t) for t in comm.sent_log if t.src == c]})
    comm.barrier()
    return comm.gather_rows(rows)


def _run_protocol(out_path: str, clients: int) -> int:
    comm = make_communicator("mpi", clients)
    rows = protocol(comm)
    if comm.is_root:
        with open(out_path, "w") as handle:
            json.dump(rows, handle)
    return 0


def _raise_on_rank_2() -> int:
    comm = make_communicator("mpi", 4)
    topology = make_topology("exponential", comm.size)
    for round in range(ROUNDS):
        if round == 1 and comm.owned == [2]:
            # The time stamp lets the test measure how fast the other ranks are ended.
            raise RuntimeError(f"injected failure in round 1 at t={time.time():.3f}")
        comm.exchange({c: client_buffer(c, round) for c in comm.owned},
                      *topology.routes(comm.owned, round))
        comm.allreduce_sum({c: client_buffer(c, round) for c in comm.owned})
    return 0


def _send_a_mismatched_buffer(numel: int) -> int:
    comm = make_communicator("mpi", 2)
    if comm.owned == [0]:
        comm.exchange({0: client_buffer(0, 0)}, {0: []}, {0: [1]})
    else:
        comm.exchange({1: client_buffer(1, 0, numel)}, {1: [0]}, {1: []})
    return 0


def _allreduce_mismatched_sizes() -> int:
    comm = make_communicator("mpi", 2)
    comm.allreduce_sum({c: client_buffer(c, 0, 7 if c == 1 else 6) for c in comm.owned})
    return 0


def _ask_for_too_many_clients() -> int:
    from mpi4py import MPI

    make_communicator("mpi", MPI.COMM_WORLD.size - 1)
    return 0


SCENARIOS = {
    "protocol": lambda: _run_protocol(sys.argv[2], int(sys.argv[3])),
    "raise": _raise_on_rank_2,
    "mismatch": lambda: _send_a_mismatched_buffer(int(sys.argv[2])),
    "allreduce-mismatch": _allreduce_mismatched_sizes,
    "wrong-size": _ask_for_too_many_clients,
}

if __name__ == "__main__":
    sys.exit(run_guarded(SCENARIOS[sys.argv[1]]))

"""The local communicator: exchange, allreduce, broadcast, gather semantics, and their errors."""

import sys

import pytest
import torch

from federation.transport.comm import (
    LocalCommunicator,
    Transfer,
    make_communicator,
    rank_blocks,
    run_guarded,
)
from federation.transport.topology import make_topology


def _buffers(k: int, n: int = 4) -> dict[int, torch.Tensor]:
    """Client c holds [100c, 100c+1, ...], so every value names its sender."""
    return {c: torch.arange(n, dtype=torch.float32) + 100 * c for c in range(k)}


def test_exchange_over_the_exponential_graph_delivers_each_senders_buffer() -> None:
    comm = make_communicator("local", 5)
    topology = make_topology("exponential", 5)
    outgoing = _buffers(5)
    for round in range(4):
        send_to, recv_from = topology.routes(comm.owned, round)
        received = comm.exchange(outgoing, send_to, recv_from)
        hop = 2 ** (round % 3)
        for c in range(5):
            (buffer,) = received[c]
            assert torch.equal(buffer, outgoing[(c - hop) % 5])


def test_exchange_returns_copies_in_recv_from_order() -> None:
    comm = LocalCommunicator(4)
    outgoing = _buffers(4)
    send_to, recv_from = make_topology("full", 4).routes(comm.owned, 0)
    recv_from[0] = [3, 1, 2]
    received = comm.exchange(outgoing, send_to, recv_from)
    assert [int(b[0]) for b in received[0]] == [300, 100, 200]
    outgoing[3].fill_(-1.0)  # the sender reuses its buffer, as FlatParameters.pack() does
    assert int(received[0][0][0]) == 300


def test_exchange_reuses_its_receive_buffers_and_refuses_them_as_outgoing() -> None:
    comm = LocalCommunicator(2)
    routes = make_topology("ring", 2).routes(comm.owned, 0)
    first = comm.exchange(_buffers(2), *routes)
    address = first[0][0].data_ptr()
    second = comm.exchange({c: b + 1000 for c, b in _buffers(2).items()}, *routes)
    assert second[0][0].data_ptr() == address
    assert int(first[0][0][0]) == 1100  # overwritten in place by the second exchange
    with pytest.raises(ValueError, match=r"outgoing\[1\] is a buffer returned by an earlier"):
        comm.exchange({0: _buffers(2)[0], 1: second[1][0]}, *routes)
    # A clone may be forwarded: client 1 passes on what it got from client 0 (0 + 1000).
    forwarded = comm.exchange({0: _buffers(2)[0], 1: second[1][0].clone()}, *routes)
    assert forwarded[0][0][0] == 1000.0


def test_exchange_logs_every_tensor_sent() -> None:
    comm = LocalCommunicator(3)
    send_to, recv_from = make_topology("ring", 3).routes(comm.owned, 0)
    comm.exchange(_buffers(3, n=7), send_to, recv_from)
    assert comm.sent_log == [Transfer("exchange", c, (c + 1) % 3, 7) for c in range(3)]


def test_exchange_refuses_inconsistent_routes() -> None:
    comm = LocalCommunicator(3)
    send_to = {0: [1], 1: [2], 2: [0]}
    recv_from = {0: [2], 1: [0], 2: [0]}
    with pytest.raises(ValueError, match="client 1 sends to 2, but 2 does not receive from 1"):
        comm.exchange(_buffers(3), send_to, recv_from)
    assert comm.sent_log == []


def test_exchange_refuses_mismatched_buffers() -> None:
    comm = LocalCommunicator(2)
    routes = ({0: [1], 1: [0]}, {0: [1], 1: [0]})
    outgoing = {0: torch.zeros(4), 1: torch.zeros(5)}
    with pytest.raises(ValueError, match="client 0 receiving from 1: got 5 elements"):
        comm.exchange(outgoing, *routes)
    outgoing = {0: torch.zeros(4), 1: torch.zeros(4, dtype=torch.float64)}
    with pytest.raises(ValueError, match="torch.float64"):
        comm.exchange(outgoing, *routes)


@pytest.mark.parametrize(
    ("send_to", "message"),
    [
        ({0: [0], 1: []}, r"invalid peers \[0\]"),
        ({0: [2], 1: []}, r"invalid peers \[2\]"),
        ({0: [1, 1], 1: []}, "names a client twice"),
        ({0: [1]}, r"send_to has clients \[0\], this process owns \[0, 1\]"),
    ],
)
def test_exchange_refuses_bad_peer_lists(send_to: dict, message: str) -> None:
    comm = LocalCommunicator(2)
    with pytest.raises(ValueError, match=message):
        comm.exchange(_buffers(2), send_to, {0: [], 1: []})


def test_exchange_refuses_tensors_mpi_cannot_send() -> None:
    comm = LocalCommunicator(2)
    routes = ({0: [1], 1: [0]}, {0: [1], 1: [0]})
    with pytest.raises(ValueError, match="requires_grad=True"):
        comm.exchange({0: torch.zeros(3, requires_grad=True), 1: torch.zeros(3)}, *routes)
    with pytest.raises(ValueError, match="contiguous=False"):
        comm.exchange({0: torch.zeros(3, 2).t(), 1: torch.zeros(2, 3)}, *routes)
    with pytest.raises(TypeError, match="dtype torch.int8"):
        comm.exchange({0: torch.zeros(3, dtype=torch.int8), 1: torch.zeros(3)}, *routes)


def test_allreduce_sum_adds_every_clients_tensor_without_touching_inputs() -> None:
    comm = LocalCommunicator(4)
    local = _buffers(4)
    total = comm.allreduce_sum(local)
    assert total.tolist() == [600.0, 604.0, 608.0, 612.0]  # sum_c (100c + i) = 600 + 4i
    assert local[0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert [t.op for t in comm.sent_log] == ["allreduce"] * 4


def test_allreduce_sum_adds_in_client_order() -> None:
    # 1e16 + 1 + 1 is 1e16 added left to right in float64, 1e16 + 2 added right to left: the
    # order is part of the result, and every backend and packing must use this one.
    local = {0: torch.tensor([1e16], dtype=torch.float64),
             1: torch.tensor([1.0], dtype=torch.float64),
             2: torch.tensor([1.0], dtype=torch.float64)}
    assert LocalCommunicator(3).allreduce_sum(local).item() == 1e16


def test_allreduce_sum_refuses_mismatched_tensors() -> None:
    comm = LocalCommunicator(2)
    with pytest.raises(ValueError, match="allreduce_sum of client 1: got 3 elements"):
        comm.allreduce_sum({0: torch.zeros(2), 1: torch.zeros(3)})


def test_broadcast_returns_a_copy_of_the_roots_tensor() -> None:
    comm = LocalCommunicator(3)
    local = _buffers(3)
    result = comm.broadcast(local, root=2)
    assert result.tolist() == [200.0, 201.0, 202.0, 203.0]
    local[2].zero_()
    assert result[0] == 200.0
    assert comm.sent_log == [Transfer("broadcast", 2, None, 4)]
    with pytest.raises(ValueError, match="broadcast root 3 is not a client id"):
        comm.broadcast(local, root=3)


def test_gather_rows_concatenates_in_client_order() -> None:
    comm = LocalCommunicator(2)
    rows = {1: [{"client": 1, "value": 0.5}], 0: [{"client": 0, "value": 0.25}] * 2}
    assert comm.gather_rows(rows) == [rows[0][0], rows[0][1], rows[1][0]]
    assert comm.is_root


def test_allgather_gives_every_clients_object_in_client_order() -> None:
    comm = LocalCommunicator(3)
    assert comm.allgather({2: "c", 0: "a", 1: "b"}) == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"by_owner has clients \[0, 1\]"):
        comm.allgather({0: "a", 1: "b"})
    assert comm.sent_log == []  # not parameters: elements_sent counts models only


@pytest.mark.parametrize(("clients", "ranks", "blocks"), [
    (4, 4, [[0], [1], [2], [3]]),
    (4, 2, [[0, 1], [2, 3]]),
    (3, 2, [[0, 1], [2]]),
    (8, 3, [[0, 1, 2], [3, 4, 5], [6, 7]]),
    (5, 1, [[0, 1, 2, 3, 4]]),
])
def test_rank_blocks_split_clients_into_balanced_contiguous_slices(
    clients: int, ranks: int, blocks: list[list[int]]
) -> None:
    assert [list(block) for block in rank_blocks(clients, ranks)] == blocks


@pytest.mark.parametrize("ranks", [0, 4])
def test_rank_blocks_refuse_more_ranks_than_clients(ranks: int) -> None:
    with pytest.raises(ValueError, match=f"3 clients cannot be split over {ranks} ranks"):
        rank_blocks(3, ranks)


def test_make_communicator_refuses_unknown_backends_and_empty_federations() -> None:
    with pytest.raises(ValueError, match=r"unknown communication backend 'nccl'"):
        make_communicator("nccl", 2)
    with pytest.raises(ValueError, match="at least one client"):
        make_communicator("local", 0)


def test_local_backend_works_without_mpi4py(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes any import of mpi4py fail, as on a laptop without MPI.
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", None)
    comm = make_communicator("local", 2)
    comm.barrier()
    assert comm.allreduce_sum(_buffers(2)).tolist() == [100.0, 102.0, 104.0, 106.0]
    with pytest.raises(ImportError):
        make_communicator("mpi", 2)


def test_run_guarded_without_mpi_returns_the_code_or_reraises() -> None:
    assert run_guarded(lambda: 0) == 0
    assert run_guarded(lambda: None) == 0
    assert run_guarded(lambda: 3) == 3

    def fail() -> int:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_guarded(fail)

"""Communicators: how clients' tensors move, written once for one process or for MPI.

Algorithms run "collectively over the clients this process owns": under MPI, R ranks split
the K clients into contiguous blocks (``rank_blocks``: rank r owns a balanced slice, one client
each when R = K), under the local backend one process owns all K clients. Every method
therefore takes and returns dicts keyed by the *owned* client ids, and the same algorithm code
runs unchanged, and deterministically, however the clients are packed: every result is
bit-for-bit that of the local backend (sums are taken in client order on every backend).

Between clients of one process tensors are copied; across ranks they travel only as
contiguous CPU buffers through mpi4py's upper-case buffer methods (``Isend``/``Irecv``,
``Ibcast``); nothing model-sized is pickled. Every
tensor a client sends is recorded in ``Communicator.sent_log`` so tests can assert what left a
client (e.g. only proxy-sized buffers under ProxyFL). Small records (metric rows, the state a
run starts from) are pickled by ``gather_rows`` and ``allgather``; docs/privacy.md's
section lists every message, and ``tests/federation/test_messages.py`` checks that list.

Under MPI no call blocks inside MPI: every operation is non-blocking and polled from Python,
so a SIGTERM handler runs at once wherever a rank waits, and a peer that sends nothing for
``timeout_s`` raises ``PeerTimeoutError`` naming it (``run_guarded`` then ends every rank).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

log = logging.getLogger(__name__)

Row = dict[str, Any]

# The tag of each kind of point-to-point message. MPI's non-overtaking rule keeps the messages
# of one kind between one pair of ranks in order, so where an exchange sends several between
# one pair (several clients per rank) both sides post them in (sender, receiver) client order.
# "probe" is the numel and dtype that precede a collective; "reduce" a running sum.
TAGS = {"exchange": 17, "gather_rows": 18, "allgather": 19, "probe": 20, "barrier": 21,
        "reduce": 22}

# Seconds between writing a failing rank's message and calling MPI Abort (see _abort_world).
_ABORT_GRACE_S = 0.2

# Environment variables by which launchers announce how many processes they started:
# MPICH/hydra, Intel MPI and Slurm's PMI-2 (PMI_SIZE), Open MPI, and srun whatever its --mpi
# (SLURM_STEP_NUM_TASKS, set for a job step's tasks; not SLURM_NTASKS, which a batch script's
# one process has too).
_LAUNCH_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")

# How to start the MPI ranks (R <= K, the K clients split among them), for error messages.
LAUNCH_HINT = "mpiexec -n R with R <= K, or under SLURM srun --mpi=pmi2 -n R"


def rank_blocks(num_clients: int, ranks: int) -> list[range]:
    """The clients of each of ``ranks`` ranks: contiguous, in client order, balanced (the first
    ``num_clients mod ranks`` ranks own one more), e.g. 3 clients on 2 ranks: [0, 1], [2]."""
    if not 1 <= ranks <= num_clients:
        raise ValueError(f"{num_clients} clients cannot be split over {ranks} ranks: "
                         "each rank needs at least one client")
    base, extra = divmod(num_clients, ranks)
    starts = [r * base + min(r, extra) for r in range(ranks + 1)]
    return [range(starts[r], starts[r + 1]) for r in range(ranks)]


def launched_processes() -> int:
    """How many processes the launcher (mpiexec, srun) says it started; 1 without one."""
    return max((int(os.environ[v]) for v in _LAUNCH_SIZE_VARIABLES
                if os.environ.get(v, "").isdigit()), default=1)


class PeerTimeoutError(TimeoutError):
    """A peer sent or took nothing for the communicator's ``timeout_s``; names it and the wait."""


class Transfer(NamedTuple):
    """One tensor sent by client ``src``: to ``dst``, or to all clients when ``dst`` is None."""

    op: str
    src: int
    dst: int | None
    numel: int


class Communicator(ABC):
    """Moves tensors between the K clients of a federation; see the module docstring.

    Attributes:
        size: number of clients K in the federation.
        processes: number of processes that share the clients (MPI ranks; 1 locally).
        owned: the client ids this process runs, ascending.
        sent_log: one ``Transfer`` per tensor an owned client sent (metrics rows excluded).
    """

    size: int
    processes: int = 1
    owned: list[int]

    def __init__(self, size: int, owned: Sequence[int]) -> None:
        if size < 1:
            raise ValueError(f"a federation needs at least one client, got num_clients={size}")
        self.size = size
        self.owned = sorted(owned)
        self.sent_log: list[Transfer] = []
        self.timeout_s: float | None = None
        self.names: Sequence[str] | None = None
        self._receive_pool: dict[tuple[int, int], torch.Tensor] = {}

    def configure(self, *, timeout_s: float | None, names: Sequence[str]) -> None:
        """Give up on a peer silent for ``timeout_s`` seconds (None: wait forever), and name
        client c ``names[c]`` (its hospital) in errors."""
        self.timeout_s = timeout_s
        self.names = list(names)

    @property
    def is_root(self) -> bool:
        """True in the one process that owns client 0 and writes the run's outputs."""
        return 0 in self.owned

    def exchange(
        self,
        outgoing: Mapping[int, torch.Tensor],
        send_to: Mapping[int, Sequence[int]],
        recv_from: Mapping[int, Sequence[int]],
    ) -> dict[int, list[torch.Tensor]]:
        """Point-to-point: each owned client ``c`` sends ``outgoing[c]`` to every client in
        ``send_to[c]`` and receives one buffer from each client in ``recv_from[c]``.

        Returns, per owned client, the received buffers in ``recv_from[c]`` order, shaped like
        ``outgoing[c]``. Every buffer in one exchange must have the receiver's ``outgoing``
        numel and dtype; a mismatch raises ``ValueError``.

        The received tensors live in receive buffers that the next ``exchange`` reuses: unpack
        them into a model or ``clone()`` them before exchanging again, and never pass one back
        as ``outgoing`` (that raises ``ValueError``). Allocating
        model-sized buffers afresh every round costs more than the transfer itself: for an
        11M-parameter ResNet-18 the page faults of a new 45 MB buffer took ~60 ms against
        ~20 ms for the ``Sendrecv`` (measured on the 2-core development VM).
        """
        self._check_owned_keys("outgoing", outgoing)
        self._check_owned_keys("send_to", send_to)
        self._check_owned_keys("recv_from", recv_from)
        pooled = {buffer.data_ptr() for buffer in self._receive_pool.values()}
        for c in self.owned:
            _check_buffer(outgoing[c], f"outgoing[{c}]")
            if outgoing[c].untyped_storage().data_ptr() in pooled:
                raise ValueError(
                    f"outgoing[{c}] is a buffer returned by an earlier exchange, which this "
                    "exchange reuses; unpack it into a model or clone() it first"
                )
            self._check_peers(c, "send_to", send_to[c])
            self._check_peers(c, "recv_from", recv_from[c])
        received = self._exchange(outgoing, send_to, recv_from)
        for c in self.owned:
            self.sent_log.extend(
                Transfer("exchange", c, d, outgoing[c].numel()) for d in send_to[c]
            )
        return received

    def allreduce_sum(self, local: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Sum of all K clients' tensors (same shape and dtype everywhere), as a fresh tensor.

        Summed in client order, ((0 + x_0) + x_1) + ..., on every backend and however the
        clients are packed into processes, so the result is the same to the last bit.
        """
        self._check_owned_keys("local", local)
        first = local[self.owned[0]]
        for c in self.owned:
            _check_buffer(local[c], f"local[{c}]")
            _check_match(local[c], first, f"allreduce_sum of client {c}")
        total = self._allreduce_sum(local)
        self.sent_log.extend(Transfer("allreduce", c, None, local[c].numel()) for c in self.owned)
        return total

    def broadcast(self, tensor_by_owner: Mapping[int, torch.Tensor], root: int) -> torch.Tensor:
        """Client ``root``'s tensor, returned as a fresh tensor to every process.

        Non-root clients pass a tensor of the same shape and dtype as a template.
        """
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} is not a client id in 0..{self.size - 1}")
        self._check_owned_keys("tensor_by_owner", tensor_by_owner)
        first = tensor_by_owner[self.owned[0]]
        for c in self.owned:
            _check_buffer(tensor_by_owner[c], f"tensor_by_owner[{c}]")
            _check_match(tensor_by_owner[c], first, f"broadcast to client {c}")
        result = self._broadcast(tensor_by_owner, root)
        if root in self.owned:
            self.sent_log.append(Transfer("broadcast", root, None, result.numel()))
        return result

    @abstractmethod
    def gather_rows(self, rows_by_owner: Mapping[int, Sequence[Row]]) -> list[Row] | None:
        """Collect small metric records from all clients, in client order, on the root process.

        Returns the list on the process where ``is_root`` is true and None elsewhere. Rows are
        pickled, which is fine for a few numbers per round and is why this must never carry
        parameters.
        """

    @abstractmethod
    def allgather(self, by_owner: Mapping[int, Any]) -> list[Any]:
        """Every client's object, in client order, on every process.

        For what every process must decide alike, such as the round to resume from: a few
        numbers and strings per client, pickled, never parameters or data.
        """

    @abstractmethod
    def barrier(self) -> None:
        """Wait until every process has reached this call."""

    @abstractmethod
    def _exchange(
        self,
        outgoing: Mapping[int, torch.Tensor],
        send_to: Mapping[int, Sequence[int]],
        recv_from: Mapping[int, Sequence[int]],
    ) -> dict[int, list[torch.Tensor]]: ...

    @abstractmethod
    def _allreduce_sum(self, local: Mapping[int, torch.Tensor]) -> torch.Tensor: ...

    @abstractmethod
    def _broadcast(self, tensor_by_owner: Mapping[int, torch.Tensor], root: int) -> torch.Tensor:
        ...

    def _copy_within(
        self,
        outgoing: Mapping[int, torch.Tensor],
        send_to: Mapping[int, Sequence[int]],
        recv_from: Mapping[int, Sequence[int]],
    ) -> dict[int, list[torch.Tensor]]:
        """The receive buffers of every owned client, filled from the owned senders.

        Checks the routes between owned clients agree (a mistake MPI would turn into a hang);
        what comes from another process's clients is left for the backend to receive.
        """
        received: dict[int, list[torch.Tensor]] = {}
        for c in self.owned:
            for d in send_to[c]:
                if d in outgoing and c not in recv_from[d]:
                    raise ValueError(f"client {c} sends to {d}, but {d} does not receive from {c}")
            buffers = self._receive_buffers(c, len(recv_from[c]), outgoing[c])
            for s, buffer in zip(recv_from[c], buffers, strict=True):
                if s not in outgoing:
                    continue
                if c not in send_to[s]:
                    raise ValueError(f"client {c} receives from {s}, but {s} does not send to {c}")
                _check_match(outgoing[s], outgoing[c], f"client {c} receiving from {s}")
                # A copy, as MPI delivers it: the sender's buffer is typically its live
                # parameters (FlatParameters.pack), which change as soon as it trains.
                buffer.copy_(outgoing[s].reshape(buffer.shape))
            received[c] = buffers
        return received

    def _add_owned(self, total: torch.Tensor, local: Mapping[int, torch.Tensor]) -> None:
        """Add the owned clients' tensors to ``total`` in place, in client order."""
        for c in self.owned:
            total += local[c].reshape(total.shape)

    def _receive_buffers(self, client: int, count: int, like: torch.Tensor) -> list[torch.Tensor]:
        """``count`` reusable buffers shaped like ``like`` for what ``client`` receives."""
        buffers = []
        for slot in range(count):
            buffer = self._receive_pool.get((client, slot))
            if buffer is None or buffer.numel() != like.numel() or buffer.dtype != like.dtype:
                buffer = torch.empty(like.numel(), dtype=like.dtype)
                self._receive_pool[client, slot] = buffer
            buffers.append(buffer.view(like.shape))
        return buffers

    def _check_owned_keys(self, what: str, by_client: Mapping[int, Any]) -> None:
        if sorted(by_client) != self.owned:
            raise ValueError(
                f"{what} has clients {sorted(by_client)}, this process owns {self.owned}"
            )

    def _check_peers(self, client: int, what: str, peers: Sequence[int]) -> None:
        if len(set(peers)) != len(peers):
            raise ValueError(f"{what}[{client}] names a client twice: {list(peers)}")
        bad = [p for p in peers if not 0 <= p < self.size or p == client]
        if bad:
            raise ValueError(
                f"{what}[{client}] has invalid peers {bad} (clients are 0..{self.size - 1}, "
                "never the client itself)"
            )


class LocalCommunicator(Communicator):
    """All K clients in this one process; no MPI is imported or initialised.

    It sees every client, so it also checks that the send and receive lists of an exchange
    agree, a mistake MPI would turn into a hang.
    """

    def __init__(self, num_clients: int) -> None:
        super().__init__(num_clients, range(num_clients))

    def gather_rows(self, rows_by_owner: Mapping[int, Sequence[Row]]) -> list[Row]:
        self._check_owned_keys("rows_by_owner", rows_by_owner)
        return [row for c in self.owned for row in rows_by_owner[c]]

    def allgather(self, by_owner: Mapping[int, Any]) -> list[Any]:
        self._check_owned_keys("by_owner", by_owner)
        return [by_owner[c] for c in self.owned]

    def barrier(self) -> None:
        return None

    def _exchange(self, outgoing, send_to, recv_from):
        return self._copy_within(outgoing, send_to, recv_from)

    def _allreduce_sum(self, local):
        total = torch.zeros_like(local[self.owned[0]])
        self._add_owned(total, local)
        return total

    def _broadcast(self, tensor_by_owner, root):
        return tensor_by_owner[root].clone()


class MPICommunicator(Communicator):
    """The K clients split over the R <= K ranks of ``COMM_WORLD`` in ``rank_blocks``; tensors
    between ranks move as buffers, between clients of one rank as copies.

    Every wait polls non-blocking requests (see the module docstring). Polling without sleep
    spins as MPICH's own blocking waits do, yielding the core between polls as they do
    (``MPIR_CVAR_POLLS_BEFORE_YIELD``), and drives MPI's progress as often.
    """

    def __init__(self, num_clients: int) -> None:
        from mpi4py import MPI  # initialises MPI, so only when this backend is chosen

        self._mpi = MPI
        self._comm = MPI.COMM_WORLD
        launched = launched_processes()
        if self._comm.size == 1 < launched:
            # srun without --mpi=pmi2 (or a launcher of another MPI) starts worlds of one.
            raise ValueError(
                f"the launcher started {launched} processes but each is an MPI world of size "
                "1 and would train alone: the launcher does not speak the MPI mpi4py uses "
                f"(with the mpich wheel: {LAUNCH_HINT})"
            )
        if self._comm.size > num_clients:
            raise ValueError(
                f"backend 'mpi' needs at most one rank per client: num_clients={num_clients} "
                f"but the MPI world has {self._comm.size} ranks (start {LAUNCH_HINT})"
            )
        self.rank = self._comm.rank
        self.processes = self._comm.size
        self._blocks = rank_blocks(num_clients, self.processes)
        super().__init__(num_clients, self._blocks[self.rank])
        # The rank that runs each client.
        self._owner = [r for r, block in enumerate(self._blocks) for _ in block]
        self._others = [r for r in range(self.processes) if r != self.rank]

    def gather_rows(self, rows_by_owner: Mapping[int, Sequence[Row]]) -> list[Row] | None:
        self._check_owned_keys("rows_by_owner", rows_by_owner)
        tag = TAGS["gather_rows"]
        mine = [row for c in self.owned for row in rows_by_owner[c]]
        if self.rank != 0:
            self._wait([self._comm.isend(mine, 0, tag)], [0], "while sending metric rows")
            return None
        others = self._receive_objects(self._others, tag, "while gathering metric rows")
        return mine + [row for r in self._others for row in others[r]]

    def allgather(self, by_owner: Mapping[int, Any]) -> list[Any]:
        self._check_owned_keys("by_owner", by_owner)
        tag = TAGS["allgather"]
        mine = [by_owner[c] for c in self.owned]
        sends = [self._comm.isend(mine, r, tag) for r in self._others]
        others = self._receive_objects(self._others, tag, "in allgather")
        self._wait(sends, self._others, "in allgather")
        return [item for r in range(self.processes)
                for item in (mine if r == self.rank else others[r])]

    def barrier(self) -> None:
        # An empty message to and from every other rank, so a missing rank can be named.
        self._all_to_all(np.empty(0, dtype=np.int64), TAGS["barrier"], "at a barrier")

    def _exchange(self, outgoing, send_to, recv_from):
        # What crosses ranks, sorted by (sender, receiver) on both sides: the order in which
        # messages between one pair of ranks are posted, and so matched.
        incoming = sorted((s, c, slot) for c in self.owned
                          for slot, s in enumerate(recv_from[c]) if s not in outgoing)
        leaving = sorted((c, d) for c in self.owned for d in send_to[c] if d not in outgoing)
        received = self._copy_within(outgoing, send_to, recv_from)
        statuses = [self._mpi.Status() for _ in incoming + leaving]
        tag = TAGS["exchange"]
        requests = [self._comm.Irecv(self._buffer(received[c][slot]), self._owner[s], tag)
                    for s, c, slot in incoming]
        requests += [self._comm.Isend(self._buffer(outgoing[c]), self._owner[d], tag)
                     for c, d in leaving]
        peers = [self._owner[s] for s, _, _ in incoming] + [self._owner[d] for _, d in leaving]
        try:
            self._wait(requests, peers, "while exchanging parameters", statuses)
        except self._mpi.Exception as error:
            # Testall reports ERR_IN_STATUS and leaves the real cause (e.g. a message longer
            # than the receive buffer) in the failed receive's status.
            causes = [(s, c, st.Get_error()) for (s, c, _), st in zip(incoming, statuses,
                                                                      strict=False)
                      if st.Get_error() != self._mpi.SUCCESS]
            if not causes and not incoming:
                raise
            s, c, code = causes[0] if causes else (*incoming[0][:2], error.error_code)
            raise ValueError(
                f"client {c} receiving parameters from client {s} (rank {self._owner[s]}) "
                f"failed (expected {outgoing[c].numel()} elements of {outgoing[c].dtype}): "
                f"{self._mpi.Get_error_string(self._mpi.Get_error_class(code))}"
            ) from error
        for (s, c, _), status in zip(incoming, statuses, strict=False):
            count = status.Get_count(_MPI_TYPES[outgoing[c].dtype](self._mpi))
            if count != outgoing[c].numel():
                raise ValueError(
                    f"client {s} (rank {self._owner[s]}) sent client {c} {count} elements of "
                    f"{outgoing[c].dtype}, expected {outgoing[c].numel()}"
                )
        return received

    def _allreduce_sum(self, local):
        # A running sum passed along the ranks in order, each adding its clients in order,
        # then broadcast from the last: the local backend's order of additions, whatever the
        # packing (MPI's own Allreduce adds in an order of its choosing).
        first = local[self.owned[0]]
        self._check_same_everywhere(first, "allreduce_sum")
        total = torch.zeros_like(first)
        tag, last = TAGS["reduce"], self.processes - 1
        if self.rank > 0:
            self._wait([self._comm.Irecv(self._buffer(total), self.rank - 1, tag)],
                       [self.rank - 1], "in allreduce_sum")
        self._add_owned(total, local)
        if self.rank < last:
            self._wait([self._comm.Isend(self._buffer(total), self.rank + 1, tag)],
                       [self.rank + 1], "in allreduce_sum")
        self._wait([self._comm.Ibcast(self._buffer(total), root=last)], None,
                   "in allreduce_sum")
        return total

    def _broadcast(self, tensor_by_owner, root):
        mine = tensor_by_owner[self.owned[0]]
        self._check_same_everywhere(mine, "broadcast")
        result = tensor_by_owner[root].clone() if root in self.owned else torch.empty_like(mine)
        self._wait([self._comm.Ibcast(self._buffer(result), root=self._owner[root])], None,
                   "in broadcast")
        return result

    def _check_same_everywhere(self, tensor: torch.Tensor, what: str) -> None:
        """Raise on every rank alike when ranks disagree on numel or dtype.

        A collective with mismatched buffers is undefined behaviour in MPI (garbage or a
        hang); telling every other rank two integers first makes it a clean error instead,
        and names a rank that does not come.
        """
        probe = np.array([tensor.numel(), _DTYPE_CODES[tensor.dtype]], dtype=np.int64)
        numels, codes = self._all_to_all(probe, TAGS["probe"], f"before {what}").T
        if numels.min() != numels.max() or codes.min() != codes.max():
            dtypes = "differ" if codes.min() != codes.max() else "agree"
            raise ValueError(
                f"{what} needs the same numel and dtype on every rank, got numel "
                f"{numels.min()}..{numels.max()} and dtypes {dtypes} (here {tensor.numel()} "
                f"of {tensor.dtype})"
            )

    def _all_to_all(self, values: np.ndarray, tag: int, what: str) -> np.ndarray:
        """Every rank's int64 ``values`` (one length everywhere), row r from rank r."""
        table = np.empty((self.processes, len(values)), dtype=np.int64)
        table[self.rank] = values
        requests = [self._comm.Irecv(table[r], r, tag) for r in self._others]
        requests += [self._comm.Isend(values, r, tag) for r in self._others]
        self._wait(requests, self._others * 2, what)
        return table

    def _receive_objects(self, sources: Sequence[int], tag: int, what: str) -> dict[int, Any]:
        """One pickled object from each rank in ``sources``, polled like ``_wait``."""
        received: dict[int, Any] = {}
        started = time.monotonic()
        while len(received) < len(sources):
            for source in sources:
                message = None if source in received else self._comm.improbe(source, tag)
                if message is not None:
                    received[source] = message.recv()
            os.sched_yield()
            self._check_deadline(started, [s for s in sources if s not in received], what)
        return received

    def _wait(self, requests: list[Any], peers: list[int] | None, what: str,
              statuses: list[Any] | None = None) -> None:
        """Complete ``requests``, one per rank in ``peers`` (None: a collective of all).

        A busy loop of ``Testall`` rather than ``Waitall``: Python gets control between tests,
        so a signal handler (SIGTERM) runs at once and a silent peer times out.
        """
        started = time.monotonic()
        while not self._mpi.Request.Testall(requests, statuses):
            os.sched_yield()  # as MPICH's blocking waits do: a peer sharing the core may run
            if self.timeout_s is not None and time.monotonic() - started > self.timeout_s:
                # Test each, keeping the statuses of those that complete meanwhile.
                kept = statuses or [None] * len(requests)
                silent = None if peers is None else [
                    p for request, p, status in zip(requests, peers, kept, strict=True)
                    if not request.Test(status)]
                self._check_deadline(started, silent, what)

    def _check_deadline(self, started: float, silent: list[int] | None, what: str) -> None:
        """Raise ``PeerTimeoutError`` once ``timeout_s`` has passed since ``started``; names
        the silent ranks and the hospitals they run."""
        if self.timeout_s is None or time.monotonic() - started <= self.timeout_s or silent == []:
            return
        if silent is None:
            peers = f"one of all {self.processes} ranks"
        else:
            peers = ", ".join(
                f"rank {r}" + (f" ({', '.join(self.names[c] for c in self._blocks[r])})"
                               if self.names else "")
                for r in dict.fromkeys(silent))  # a rank once, in order
        raise PeerTimeoutError(
            f"no answer from {peers} in {self.timeout_s:g} s (comm_timeout_s) {what}")

    def _buffer(self, tensor: torch.Tensor) -> list[Any]:
        return [tensor.numpy(), _MPI_TYPES[tensor.dtype](self._mpi)]


# dtype -> MPI datatype, looked up lazily because mpi4py must not be imported at module load.
_MPI_TYPES: dict[torch.dtype, Callable[[Any], Any]] = {
    torch.float32: lambda mpi: mpi.FLOAT,
    torch.float64: lambda mpi: mpi.DOUBLE,
    torch.int64: lambda mpi: mpi.INT64_T,
}
_DTYPE_CODES = {dtype: code for code, dtype in enumerate(_MPI_TYPES)}


def _check_buffer(tensor: torch.Tensor, what: str) -> None:
    """A tensor must be a contiguous CPU tensor of a supported dtype to be sent as a buffer."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what} is a {type(tensor).__name__}, expected a torch.Tensor")
    if tensor.dtype not in _MPI_TYPES:
        supported = ", ".join(str(d) for d in _MPI_TYPES)
        raise TypeError(f"{what} has dtype {tensor.dtype}; supported: {supported}")
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.requires_grad:
        raise ValueError(
            f"{what} must be a contiguous CPU tensor without grad (device={tensor.device}, "
            f"contiguous={tensor.is_contiguous()}, requires_grad={tensor.requires_grad})"
        )


def _check_match(tensor: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Buffers match when numel and dtype agree, the same test MPI's element counts make."""
    if tensor.numel() != expected.numel() or tensor.dtype != expected.dtype:
        raise ValueError(
            f"{what}: got {tensor.numel()} elements of {tensor.dtype}, "
            f"expected {expected.numel()} of {expected.dtype}"
        )


_BACKENDS: dict[str, Callable[[int], Communicator]] = {
    "local": LocalCommunicator,
    "mpi": MPICommunicator,
}


def make_communicator(backend: str, num_clients: int) -> Communicator:
    """The communicator registered as ``backend`` ("local" or "mpi") for ``num_clients``."""
    try:
        factory = _BACKENDS[backend]
    except KeyError:
        raise ValueError(
            f"unknown communication backend {backend!r}; choose one of {sorted(_BACKENDS)}"
        ) from None
    communicator = factory(num_clients)
    log.debug("%s communicator: %d clients, this process owns %s",
              backend, num_clients, communicator.owned)
    return communicator


def run_guarded(main: Callable[[], int | None]) -> int:
    """Run ``main`` so that a failure on one MPI rank ends every rank within seconds.

    Under MPI with more than one rank, an exception (or a non-zero exit) on any rank writes the
    traceback and ``rank R: <ExcType>: <message>`` to stderr and calls ``COMM_WORLD.Abort``:
    otherwise the other ranks would wait forever in their next send, receive or collective.
    The CLI's SIGTERM handler exits with 128 + 15, written ``rank R: terminated by SIGTERM``;
    Ctrl-C, ``rank R: interrupted``.
    Without MPI the exception propagates unchanged. Returns ``main``'s exit code (None -> 0).
    """
    try:
        code = main() or 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        if code:
            _abort_world(code, _exit_reason(code, stop))
        raise
    except KeyboardInterrupt:
        _abort_world(130, "interrupted")
        raise
    except Exception as error:
        _abort_world(1, f"{type(error).__name__}: {error}", traceback.format_exc())
        raise
    if code:
        _abort_world(code, f"exited with code {code}")
    return code


def _exit_reason(code: int, stop: SystemExit) -> str:
    """Why a rank exits: ``terminated by SIGTERM`` for the CLI's exit code 128 + signal."""
    try:
        return f"terminated by {signal.Signals(code - 128).name}"
    except ValueError:
        return f"SystemExit: {stop.code}"


def _abort_world(code: int, reason: str, details: str = "") -> None:
    """Abort COMM_WORLD if this process is one of several MPI ranks; otherwise do nothing."""
    mpi_module = sys.modules.get("mpi4py.MPI")  # never import (and so initialise) MPI here
    if mpi_module is None or not mpi_module.Is_initialized() or mpi_module.Is_finalized():
        return
    world = mpi_module.COMM_WORLD
    if world.size == 1:
        return
    # Written straight to stderr, not through logging: it must be out before Abort kills this
    # process, whatever logging handlers the caller has configured.
    sys.stderr.write(f"{details}rank {world.rank}: {reason}\n")
    sys.stderr.flush()
    # Abort makes hydra tear the job down at once, and what its proxy has not yet forwarded
    # from this rank's stderr pipe is lost: without a pause the message vanished in 3 of 23
    # runs of tests/federation/test_comm_mpi.py's mismatch case (0 of 20 with it).
    time.sleep(_ABORT_GRACE_S)
    world.Abort(code)
    # MPICH's Abort can return while the process manager tears the job down; leave now rather
    # than unwind into interpreter shutdown (and mpi4py's MPI_Finalize).
    os._exit(code)

"""Micro-benchmark: moving a model as one flat MPI buffer versus as a pickled ``state_dict``.

Run under MPI with two (or more) ranks; rank 0 prints one JSON object::

    .venv/bin/mpiexec -n 2 .venv/bin/python -m benchmarks.comm

For each model every rank passes its parameters to the next rank on a ring and receives the
previous rank's, end to end from model to model:

* ``flat``: ``FlatParameters.pack`` -> ``MPICommunicator.exchange`` (``Sendrecv`` of one
  contiguous float32 buffer) -> ``FlatParameters.unpack``, the engine's path;
* ``pickled``: ``state_dict()`` -> lower-case ``sendrecv`` (pickle) -> ``load_state_dict``,
  on an ordinary copy of the model, as code without ``FlatParameters`` would do it (pickling a
  bound model's state_dict would serialise its shared storage once per tensor).

Times are the slowest rank's per exchange, summarised over repeats as median and best.

``polling`` measures what the engine's interruptible waits cost (``MPICommunicator._wait``
polls non-blocking requests, see ``federation.transport.comm``), each against MPI's blocking call on
the same buffers in the same run: ``Sendrecv`` against polled ``Isend``/``Irecv``,
``Allreduce`` against polled ``Iallreduce``, and the collectives' numel/dtype check as a
4-integer ``Allreduce`` against the point-to-point check that can name a missing rank.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.options import add_comm_arguments
from federation.transport.comm import MPICommunicator, run_guarded
from federation.transport.flat import FlatParameters
from federation.transport.topology import make_topology

log = logging.getLogger(__name__)


def _mlp() -> nn.Module:
    """The ProxyFL paper's MNIST MLP, 784-200-200-10."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(),
        nn.Linear(200, 10),
    )


def _resnet18() -> nn.Module:
    """torchvision's ResNet-18 with GroupNorm, so its parameters are its whole state."""
    from torchvision.models import resnet18

    return resnet18(weights=None, num_classes=10, norm_layer=lambda c: nn.GroupNorm(32, c))


BENCH_MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": _mlp, "resnet18": _resnet18}


def bench_exchange(
    model_names: Sequence[str] = ("mlp", "resnet18"), repeats: int = 20, warmup: int = 3
) -> dict[str, dict[str, Any]]:
    """Time flat-buffer and pickled exchanges of each model on a ring of all MPI ranks.

    Returns, per model: ``parameters``, ``megabytes`` (float32), and ``flat_ms``,
    ``pickled_ms``, ``speedup`` (pickled / flat) and ``unpack_ms`` (the flat path's one copy,
    into the model), each as ``{"median": ..., "best": ...}`` over ``repeats``: the median is
    the typical cost, the best is what is left when other processes do not interfere.
    """
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if world.size < 2:
        raise ValueError(f"bench_exchange needs at least 2 MPI ranks, got {world.size}")
    unknown = sorted(set(model_names) - set(BENCH_MODELS))
    if unknown:
        raise ValueError(f"unknown benchmark models {unknown}; choose from {sorted(BENCH_MODELS)}")
    comm = MPICommunicator(world.size)
    results = {}
    for name in model_names:
        torch.manual_seed(comm.rank)
        results[name] = _bench_model(comm, world, name, repeats, warmup)
        log.info("%s: %s", name, results[name])
    return results


def _bench_model(
    comm: MPICommunicator, world: Any, name: str, repeats: int, warmup: int
) -> dict[str, Any]:
    """Time one model's ways of moving its parameters (see ``bench_exchange``)."""
    rank = comm.rank
    routes = make_topology("ring", comm.size).routes(comm.owned, 0)
    dst, src = routes[0][rank][0], routes[1][rank][0]
    model = BENCH_MODELS[name]()
    flat = FlatParameters(copy.deepcopy(model), name)
    received_copy = flat.pack().clone()

    def flat_exchange() -> None:
        (received,) = comm.exchange({rank: flat.pack()}, *routes)[rank]
        flat.unpack(received)

    def pickled_exchange() -> None:
        model.load_state_dict(world.sendrecv(model.state_dict(), dest=dst, source=src))

    def unpack_only() -> None:
        flat.unpack(received_copy)

    flat_ms = _slowest_rank_ms(world, flat_exchange, repeats, warmup)
    pickled_ms = _slowest_rank_ms(world, pickled_exchange, repeats, warmup)
    unpack_ms = _slowest_rank_ms(world, unpack_only, repeats, warmup)
    return {
        "parameters": flat.numel,
        "megabytes": round(flat.numel * 4 / 1e6, 2),
        "flat_ms": _summary(flat_ms),
        "pickled_ms": _summary(pickled_ms),
        "speedup": {
            "median": round(float(np.median(pickled_ms) / np.median(flat_ms)), 1),
            "best": round(float(pickled_ms.min() / flat_ms.min()), 1),
        },
        "unpack_ms": _summary(unpack_ms),
        "polling": _bench_polling(comm, world, flat.pack().numpy(), dst, src, repeats, warmup),
    }


def _bench_polling(comm: MPICommunicator, world: Any, send: np.ndarray, dst: int, src: int,
                   repeats: int, warmup: int) -> dict[str, Any]:
    """Blocking MPI calls against the engine's polled waits on the same buffers (see the
    module docstring): per pair the slowest rank's ms and polled / blocking of the medians."""
    from mpi4py import MPI

    received = np.empty_like(send)
    probe, extremes = np.zeros(4, dtype=np.int64), np.empty(4, dtype=np.int64)
    tensor = torch.from_numpy(send)
    pairs = {
        "sendrecv": (lambda: world.Sendrecv(send, dst, 0, received, src, 0),
                     lambda: comm._wait([world.Irecv(received, src, 0),
                                         world.Isend(send, dst, 0)], [src, dst], "")),
        "allreduce": (lambda: world.Allreduce(send, received, op=MPI.SUM),
                      lambda: comm._wait([world.Iallreduce(send, received, op=MPI.SUM)],
                                         None, "")),
        "check": (lambda: world.Allreduce(probe, extremes, op=MPI.MAX),
                  lambda: comm._check_same_everywhere(tensor, "")),
    }
    results = {}
    for name, (blocking, polled) in pairs.items():
        blocking_ms = _slowest_rank_ms(world, blocking, repeats, warmup)
        polled_ms = _slowest_rank_ms(world, polled, repeats, warmup)
        results[name] = {"blocking_ms": _summary(blocking_ms), "polled_ms": _summary(polled_ms),
                         "ratio": round(float(np.median(polled_ms) / np.median(blocking_ms)), 2)}
    return results


def _slowest_rank_ms(world: Any, fn: Callable[[], None], repeats: int, warmup: int) -> np.ndarray:
    """Per repeat, the slowest rank's wall time in ms for one call of ``fn``."""
    from mpi4py import MPI

    for _ in range(warmup):
        fn()
    seconds = np.empty(repeats)
    for i in range(repeats):
        world.Barrier()  # start together, so one rank's lag is not charged to the next call
        start = time.perf_counter()
        fn()
        seconds[i] = time.perf_counter() - start
    slowest = np.empty_like(seconds)
    world.Allreduce(seconds, slowest, op=MPI.MAX)
    return slowest * 1e3


def _summary(milliseconds: np.ndarray) -> dict[str, float]:
    return {"median": round(float(np.median(milliseconds)), 3),
            "best": round(float(milliseconds.min()), 3)}


def command(args: argparse.Namespace) -> int:
    """``mpiexec -n R slidefed bench comm``: run ``bench_exchange`` and print its result as
    JSON on rank 0; a failure on one rank ends every rank (``run_guarded``)."""

    def exchange() -> int:
        # One thread per rank: the ranks already share the cores, extra threads only contend.
        torch.set_num_threads(1)
        results = bench_exchange(args.models, repeats=args.repeats)
        from mpi4py import MPI

        if MPI.COMM_WORLD.rank == 0:
            world = {"ranks": MPI.COMM_WORLD.size,
                     "mpi": MPI.Get_library_version().splitlines()[0]}
            print(json.dumps({**world, "models": results}, indent=2))
        return 0

    return run_guarded(exchange)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``python -m benchmarks.comm``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_comm_arguments(parser)
    return command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""Run by tests/federation/test_federate_mpi.py under ``mpiexec -n 2``: K hospitals on two disks of
their own (one rank each; K = 2, or 4 for two hospitals per rank), with every call into
mpi4py recorded.

    python federate_on_own_disks.py DIGITS OUT K

Rank r keeps its files in ``OUT/<algorithm>_disk_<r>`` (its own ``output_dir``). It runs
ProxyFL for 2 rounds and resumes it to 3, then FedAvg for 2 rounds, and writes every call its
communicator made into ``COMM_WORLD`` — the method, and what it sends: a buffer's element
count, or the object it pickles, and for a send the kind of message its tag marks — to
``OUT/calls_<r>.json``. Then rank 1's disk loses the ProxyFL checkpoint of its last
hospital and both ranks try to resume to 4 rounds, printing ``error: ...``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))  # the tests' helpers
from federation_synthetic import small_config  # noqa: E402

from federation.config import ConfigError, config_from_dict  # noqa: E402
from federation.loop import run_federation  # noqa: E402
from federation.privacy.randomness import fixed_secrets_for_tests  # noqa: E402
from federation.transport.comm import TAGS, MPICommunicator  # noqa: E402


class RecordingComm:
    """A stand-in for mpi4py's ``COMM_WORLD`` that logs each call before making it."""

    def __init__(self, comm: Any, calls: list[dict[str, Any]]) -> None:
        self._comm = comm
        self._calls = calls

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._comm, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            self._calls.append({"method": name, "sent": _sent(name, args),
                                "kind": KINDS.get(args[2]) if name.lower() == "isend" else None})
            return attribute(*args, **kwargs)

        return call


KINDS = {tag: kind for kind, tag in TAGS.items()}


def _sent(method: str, args: tuple) -> Any:
    """What a call sends: the pickled object, a buffer's element count, or None."""
    if method == "isend":
        return args[0]
    if method in ("improbe", "Irecv"):
        return None
    buffer = args[0]
    return int((buffer[0] if isinstance(buffer, list) else buffer).size)


def _federate(digits: Path, out: Path, algorithm: str, calls: list, *, clients: int,
              rounds: int, resume: bool = False) -> None:
    comm = MPICommunicator(clients)
    comm._comm = RecordingComm(comm._comm, calls)
    config = config_from_dict(small_config(
        digits, out / f"{algorithm}_disk_{comm.rank}", algorithm=algorithm, clients=clients,
        rounds=rounds, checkpoint_every=1, backend="mpi", **{"model.private": "lenet5"}))
    run_federation(config, comm, resume=resume)


def main(digits: Path, out: Path, clients: int) -> None:
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.rank
    calls: dict[str, list] = {"proxyfl": [], "fedavg": []}
    # The first run's secrets are fixed, so the test can compare with a local run given the
    # same; the resume reads each hospital's secret back from its own checkpoint.
    with fixed_secrets_for_tests(0):
        _federate(digits, out, "proxyfl", calls["proxyfl"], clients=clients, rounds=2)
    _federate(digits, out, "proxyfl", calls["proxyfl"], clients=clients, rounds=3, resume=True)
    _federate(digits, out, "fedavg", calls["fedavg"], clients=clients, rounds=2)
    (out / f"calls_{rank}.json").write_text(json.dumps(calls))
    if rank == 1:
        last = f"client_{clients - 1}"
        shutil.rmtree(out / "proxyfl_disk_1" / "hospitals" / last / "checkpoints")
    try:
        _federate(digits, out, "proxyfl", [], clients=clients, rounds=4, resume=True)
    except ConfigError as error:
        # One write per line: print's separate newline lets hydra interleave the two ranks'
        # lines when stdout is unbuffered (PYTHONUNBUFFERED).
        sys.stdout.write(f"error: {error}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))

"""The MPI communicator under a real ``mpiexec``: same results as the local backend, and no hangs.

Each test launches tests/mpi_scripts/comm_protocol.py with the mpiexec that sits next to the
venv's python (MPICH's hydra from the ``mpich`` wheel; no extra environment needed) under a
subprocess timeout, so a hang fails the test instead of stalling the suite.
"""

import importlib.util
import json
import math
import re
import subprocess
from pathlib import Path

import pytest
from mpi_launch import REPO, run_mpiexec

from federation.transport.comm import LocalCommunicator

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

SCRIPT = REPO / "tests" / "mpi_scripts" / "comm_protocol.py"
TIMEOUT_S = 60


def _load_script():
    spec = importlib.util.spec_from_file_location("comm_protocol", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mpiexec(ranks: int, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run the protocol script under mpiexec; returns the result and the time it ended."""
    return run_mpiexec(ranks, str(SCRIPT), *args, timeout=TIMEOUT_S)


@pytest.mark.parametrize(("clients", "ranks"), [(4, 4), (4, 2), (3, 2)],
                         ids=["one-per-rank", "4-on-2", "3-on-2"])
def test_mpi_backend_gives_the_local_backends_results(
    tmp_path: Path, clients: int, ranks: int
) -> None:
    script = _load_script()
    out = tmp_path / "rows.json"
    result, _ = _mpiexec(ranks, "protocol", str(out), str(clients))
    assert result.returncode == 0, result.stderr[-2000:]
    mpi_rows = json.loads(out.read_text())
    local_rows = json.loads(json.dumps(script.protocol(LocalCommunicator(clients))))
    assert mpi_rows == local_rows

    # And the shared results are right, not merely equal: check them against their definitions.
    by_op = {}
    for row in mpi_rows:
        by_op.setdefault(row["op"], []).append(row)
    k, period = clients, math.ceil(math.log2(clients))
    for row in by_op["exchange"]:
        sender = (row["client"] - 2 ** (row["round"] % period)) % k
        assert row["value"] == [script.client_buffer(sender, row["round"]).tolist()]
    for row in by_op["exchange_full"]:  # several messages between one pair of ranks
        assert row["value"] == [script.client_buffer(s, script.ROUNDS).tolist()
                                for s in range(k) if s != row["client"]]
    expected_sum = sum(script.client_buffer(c, 0) for c in range(k)).tolist()
    assert all(row["value"] == expected_sum for row in by_op["allreduce"])
    assert all(row["value"] == script.client_buffer(k - 1, 9).tolist()
               for row in by_op["broadcast"])
    for row in by_op["sent"]:
        c = row["client"]
        exchanged = [[op, src, dst, n] for op, src, dst, n in row["value"] if op == "exchange"]
        assert exchanged[:3] == [["exchange", c, (c + 2 ** (t % period)) % k, 6]
                                 for t in range(3)]
        assert exchanged[3:] == [["exchange", c, d, 6] for d in range(k) if d != c]
        assert ["allreduce", c, None, 6] in row["value"]
        assert (["broadcast", c, None, 6] in row["value"]) == (c == k - 1)


def test_an_exception_on_one_rank_ends_every_rank_quickly() -> None:
    result, ended = _mpiexec(4, "raise")
    assert result.returncode != 0
    match = re.search(r"rank 2: RuntimeError: injected failure in round 1 at t=([\d.]+)",
                      result.stderr)
    assert match, result.stderr[-2000:]
    assert ended - float(match.group(1)) < 10.0


@pytest.mark.parametrize(
    ("numel", "message"),
    [
        (8, r"rank 0: ValueError: client 0 receiving parameters from client 1 \(rank 1\) "
            r"failed \(expected 6 elements of torch.float32\): Message truncated"),
        (4, r"rank 0: ValueError: client 1 \(rank 1\) sent client 0 4 elements of "
            r"torch.float32, expected 6"),
    ],
    ids=["longer", "shorter"],
)
def test_a_buffer_of_the_wrong_size_is_a_clean_error(numel: int, message: str) -> None:
    result, _ = _mpiexec(2, "mismatch", str(numel))
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr[-2000:]


def test_collectives_refuse_ranks_that_disagree_on_the_buffer() -> None:
    result, _ = _mpiexec(2, "allreduce-mismatch")
    assert result.returncode != 0
    assert re.search(r"rank [01]: ValueError: allreduce_sum needs the same numel and dtype "
                     r"on every rank, got numel 6..7", result.stderr), result.stderr[-2000:]


def test_mpi_backend_refuses_more_ranks_than_clients() -> None:
    result, _ = _mpiexec(2, "wrong-size")
    assert result.returncode != 0
    # One line per rank that gets to write it before the first one's Abort ends the job.
    message = ("ValueError: backend 'mpi' needs at most one rank per client: num_clients=1 "
               "but the MPI world has 2 ranks (start mpiexec -n R with R <= K, or under SLURM "
               "srun --mpi=pmi2 -n R)")
    errors = [line for line in result.stderr.splitlines() if line.startswith("rank ")]
    assert errors and all(re.fullmatch(rf"rank [01]: {re.escape(message)}", line)
                          for line in errors), result.stderr



def test_the_benchmark_cli_reports_both_paths_for_the_mlp() -> None:
    result, _ = run_mpiexec(2, "-m", "benchmarks.comm", "--models", "mlp", "--repeats", "5")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    mlp = report["models"]["mlp"]
    assert report["ranks"] == 2
    assert mlp["parameters"] == 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10
    # Flat buffers beat pickling by 10-20x here; 2x leaves room for a busy machine.
    assert mlp["speedup"]["best"] > 2.0
    assert set(mlp["polling"]) == {"sendrecv", "allreduce", "check"}

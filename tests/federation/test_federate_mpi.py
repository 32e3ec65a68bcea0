"""``slidefed federate`` under a real ``mpiexec``: the local backend's results, only proxies on
the wire, and a failing rank that ends the whole job quickly.

Each test launches the command line with the mpiexec next to the venv's python (MPICH's hydra
from the ``mpich`` wheel) under a subprocess timeout, so a hang fails the test instead of
stalling the suite.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from federation_synthetic import small_config, write_synthetic_digits
from mpi_launch import REPO, run_mpiexec, start_mpiexec, wait_mpiexec
from test_messages import fields_as_listed

from federation.config import config_from_dict
from federation.loop import run_federation
from federation.privacy.randomness import fixed_secrets_for_tests

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

FAILING = REPO / "tests" / "mpi_scripts" / "federate_failing_client.py"
OWN_DISKS = REPO / "tests" / "mpi_scripts" / "federate_on_own_disks.py"
HANGING = REPO / "tests" / "mpi_scripts" / "federate_hanging_client.py"
FIXED_SECRETS = REPO / "tests" / "mpi_scripts" / "federate_with_fixed_secrets.py"
TIMEOUT_S = 120


def _mpiexec(ranks: int, *command: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``command`` under mpiexec; returns the result and the time it ended."""
    return run_mpiexec(ranks, *command, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_synthetic_digits(tmp_path_factory.mktemp("digits"))


def _write_config(digits: Path, tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(small_config(digits, tmp_path / "unused", **overrides)))
    return path


def _assert_same_files(run: Path, local: Path, clients: int) -> None:
    """The run-level and every hospital's metrics and ε, byte for byte, and the summary's."""
    names = ["metrics.csv", "privacy.csv", *(f"hospitals/client_{c}/{f}" for c in range(clients)
                                             for f in ("metrics.csv", "privacy.csv"))]
    for name in names:
        assert (run / name).read_text() == (local / name).read_text(), name
    summary = json.loads((run / "summary.json").read_text())
    local_summary = json.loads((local / "summary.json").read_text())
    assert summary["final"] == local_summary["final"]
    assert summary["elements_sent"] == local_summary["elements_sent"]


@pytest.mark.parametrize(("clients", "ranks"), [(4, 4), (4, 2), (3, 2)],
                         ids=["one-per-rank", "4-on-2", "3-on-2"])
@pytest.mark.parametrize("algorithm", ["proxyfl", "fedavg"])
def test_mpi_run_writes_the_local_backends_files(
    digits: Path, tmp_path: Path, algorithm: str, clients: int, ranks: int
) -> None:
    overrides = {"algorithm": algorithm, "rounds": 3, "fedavg.client_fraction": 0.5,
                 "clients": clients}
    path = _write_config(digits, tmp_path, **overrides)
    result, _ = _mpiexec(ranks, str(FIXED_SECRETS), "-q", "federate", "--config", str(path),
                         "--backend", "mpi", "--set", f"output_dir={tmp_path / 'mpi'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"{algorithm}: 3 rounds, {clients} clients")

    with fixed_secrets_for_tests(0):  # the hospitals' secrets the MPI run held
        run_federation(config_from_dict(small_config(digits, tmp_path / "local", **overrides)))
    _assert_same_files(tmp_path / "mpi", tmp_path / "local", clients)
    if algorithm == "proxyfl":
        proxy = 8 * 8 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10  # the 64-200-200-10 MLP
        summary = json.loads((tmp_path / "mpi" / "summary.json").read_text())
        assert summary["elements_sent"] == 3 * clients * proxy  # one proxy per client a round


def test_a_run_resumed_on_fewer_ranks_gives_the_uninterrupted_files(
    digits: Path, tmp_path: Path
) -> None:
    # 2 rounds on one rank per client, then round 3 with the 4 clients packed on 2 ranks.
    path = _write_config(digits, tmp_path, checkpoint_every=1)
    command = ["-q", "federate", "--config", str(path), "--backend", "mpi",
               "--set", f"output_dir={tmp_path / 'mpi'}"]
    result, _ = _mpiexec(4, str(FIXED_SECRETS), *command, "--set", "rounds=2")
    assert result.returncode == 0, result.stderr[-3000:]
    # The resumed ranks draw fresh keys and read each hospital's secret back from its
    # checkpoint.
    result, _ = _mpiexec(2, "-m", "slidefed", *command, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    with fixed_secrets_for_tests(0):
        run_federation(config_from_dict(small_config(digits, tmp_path / "local",
                                                     checkpoint_every=1)))
    _assert_same_files(tmp_path / "mpi", tmp_path / "local", 4)


def test_a_local_backend_under_a_launch_of_two_is_refused(digits: Path, tmp_path: Path) -> None:
    # Each rank would run the whole federation, both into one output_dir.
    path = _write_config(digits, tmp_path)
    result, _ = _mpiexec(2, "-m", "slidefed", "federate", "--config", str(path),
                         "--backend", "local", "--set", f"output_dir={tmp_path / 'run'}")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines == ["error: backend local under an MPI launch of 2 processes would run 2 whole "
                     "federations into one output_dir; use --backend mpi, or start one "
                     "process"] * 2
    assert not (tmp_path / "run").exists()


def test_an_exception_on_one_rank_ends_every_rank_with_its_message(
    digits: Path, tmp_path: Path
) -> None:
    path = _write_config(digits, tmp_path, algorithm="regular_failing_on_client_2", rounds=4)
    result, ended = _mpiexec(4, str(FAILING), "-q", "federate", "--config", str(path),
                             "--backend", "mpi", "--set", f"output_dir={tmp_path / 'out'}")
    assert result.returncode != 0
    assert "rank 2: RuntimeError: client 2 lost its data disk" in result.stderr
    failed_at = float(re.search(r"failing at ([0-9.]+)", result.stderr).group(1))
    assert ended - failed_at < 10, f"the job took {ended - failed_at:.1f} s to end"


def _hanging_run(digits: Path, tmp_path: Path, algorithm: str, *settings: str,
                 clients: int = 2) -> tuple:
    """Start 2 ranks of ``slidefed federate`` whose client 1 hangs in round 2; returns the
    mpiexec process and the folder where each client marks ``<pid> <time>`` as it gets there."""
    path = _write_config(digits, tmp_path, algorithm=f"{algorithm}_hanging_on_client_1",
                         clients=clients)
    marks = tmp_path / "marks"
    marks.mkdir()
    process = start_mpiexec(
        2, str(HANGING), "-q", "federate", "--config", str(path), "--backend", "mpi",
        "--set", f"output_dir={tmp_path / 'out'}", *settings, env={"HANG_DIR": str(marks)})
    return process, marks


def test_a_rank_that_stops_answering_ends_the_job_with_an_error_naming_it(
    digits: Path, tmp_path: Path
) -> None:
    process, marks = _hanging_run(digits, tmp_path, "proxyfl", "--set", "comm_timeout_s=3")
    result, ended = wait_mpiexec(process, TIMEOUT_S)
    assert result.returncode != 0
    assert ("rank 0: PeerTimeoutError: no answer from rank 1 (client_1) in 3 s "
            "(comm_timeout_s) while exchanging parameters\n") in result.stderr, result.stderr
    hung_at = float((marks / "client_1").read_text().split()[1])
    assert 3 < ended - hung_at < 3 + 7, f"the job took {ended - hung_at:.1f} s to end"


def test_a_silent_rank_of_several_hospitals_is_named_with_all_of_them(
    digits: Path, tmp_path: Path
) -> None:
    # 3 clients on 2 ranks: rank 0 runs clients 0 and 1, and hangs with client 1; in round 2
    # client 2 (rank 1) receives from client 0.
    process, _ = _hanging_run(digits, tmp_path, "proxyfl", "--set", "comm_timeout_s=3",
                              clients=3)
    result, _ = wait_mpiexec(process, TIMEOUT_S)
    assert result.returncode != 0
    assert ("rank 1: PeerTimeoutError: no answer from rank 0 (client_0, client_1) in 3 s "
            "(comm_timeout_s) while exchanging parameters\n") in result.stderr, result.stderr


@pytest.mark.parametrize("target", ["waiting rank", "mpiexec"])
def test_sigterm_ends_a_job_waiting_in_a_collective_within_seconds(
    digits: Path, tmp_path: Path, target: str
) -> None:
    # FedAvg: client 0 waits in allreduce_sum for client 1, which hangs; no timeout helps.
    process, marks = _hanging_run(digits, tmp_path, "fedavg")
    deadline = time.time() + TIMEOUT_S
    while len(list(marks.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(2)  # client 0 trains its round in well under that, then waits
    waiting = int((marks / "client_0").read_text().split()[0])
    os.kill(process.pid if target == "mpiexec" else waiting, signal.SIGTERM)
    signalled = time.time()
    result, ended = wait_mpiexec(process, TIMEOUT_S)
    assert result.returncode != 0
    assert "rank 0: terminated by SIGTERM\n" in result.stderr, result.stderr[-3000:]
    assert ended - signalled < 5, f"the job took {ended - signalled:.1f} s to end"
    assert not list((tmp_path / "out").rglob(".*.partial-*"))


@pytest.mark.parametrize("clients", [2, 4], ids=["one-per-rank", "two-per-rank"])
def test_hospitals_on_disks_of_their_own_send_only_the_listed_messages(
    digits: Path, tmp_path: Path, clients: int
) -> None:
    """Two ranks, each with its own output_dir: each writes only its hospitals' files, a
    resume agrees, every mpi4py call is one docs/privacy.md lists, and a hospital that lost its
    checkpoint stops the next resume with the same line on both ranks."""
    result, _ = _mpiexec(2, str(OWN_DISKS), str(digits), str(tmp_path), str(clients))
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    held = "; ".join([*(f"client_{c}: 3" for c in range(clients - 1)),
                      f"client_{clients - 1}: none"])
    assert errors == [f"error: --resume: the hospitals hold checkpoints of no common round "
                      f"({held}); every hospital must resume from the same "
                      "round: restore the missing hospitals/<name>/checkpoints, or start "
                      "afresh with --force"] * 2

    disk_0, disk_1 = tmp_path / "proxyfl_disk_0", tmp_path / "proxyfl_disk_1"
    half = clients // 2
    owned = {disk_0: range(half), disk_1: range(half, clients)}
    for disk, hospitals in owned.items():
        assert sorted(p.name for p in (disk / "hospitals").iterdir()) == [
            f"client_{c}" for c in hospitals]
    assert [p.name for p in disk_1.iterdir()] == ["hospitals"]  # no run-level file there
    # Resumed on separate disks, the files are those of one uninterrupted local run.
    local = tmp_path / "local"
    with fixed_secrets_for_tests(0):  # the hospitals' secrets of the MPI run
        run_federation(config_from_dict(small_config(
            digits, local, clients=clients, rounds=3, checkpoint_every=1,
            **{"model.private": "lenet5"})))
    for name in ("metrics.csv", "privacy.csv"):
        assert (disk_0 / name).read_text() == (local / name).read_text(), name
    for disk, hospitals in owned.items():
        for c in hospitals:
            name = f"hospitals/client_{c}/metrics.csv"
            assert (disk / name).read_text() == (local / name).read_text(), name

    proxy = 8 * 8 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10  # the 64-200-200-10 MLP
    for rank in (0, 1):
        calls = json.loads((tmp_path / f"calls_{rank}.json").read_text())
        barrier = ("Isend", "barrier", 0)  # an empty message to every other rank
        # FedAvg's sum: rank 0's running sum to rank 1, then broadcast from rank 1.
        running_sum = {("Isend", "reduce", proxy + 1)} if rank == 0 else set()
        for algorithm, buffers in (
            ("proxyfl", {("Isend", "exchange", proxy), barrier}),
            ("fedavg", {("Isend", "probe", 2), *running_sum, ("Ibcast", None, proxy + 1),
                        barrier}),
        ):
            made = calls[algorithm]
            assert {c["method"] for c in made} == {"isend", "improbe", "Isend", "Irecv",
                                                   *(method for method, _, _ in buffers)}
            assert {(c["method"], c["kind"], c["sent"]) for c in made
                    if c["method"] in ("Isend", "Ibcast")} == buffers
            # Pickled: start facts to every other rank, metric rows from client 1 to client 0.
            assert {c["kind"] for c in made if c["method"] == "isend"} == (
                {"allgather", "gather_rows"} if rank == 1 else {"allgather"})
            starts = [c["sent"] for c in made if c["kind"] == "allgather"]
            assert len(starts) == (2 if algorithm == "proxyfl" else 1)  # one per run
            # The StartFacts of each hospital of the rank.
            assert all(len(facts) == half and all(len(fact) == 4 for fact in facts)
                       for facts in starts)
            for call in made:
                if call["kind"] == "gather_rows":
                    for row in call["sent"]:
                        # the script's runs opt in to sharing timings (the tests' configs)
                        assert fields_as_listed(row, share_timings=True), row
                        assert row.get("split") != "train", "a training loss crossed"


@pytest.mark.parametrize("backend, message", [
    ("auto", "the launcher started 3 processes but none is an MPI rank, so each would train "
             "every client alone"),
    ("mpi", "the launcher started 3 processes but each is an MPI world of size 1 and would "
            "train alone"),
])
def test_srun_without_pmi2_stops_every_task_instead_of_training_alone(
    digits: Path, tmp_path: Path, backend: str, message: str
) -> None:
    # What `srun -n 3` without --mpi=pmi2 starts: three tasks told of the step's size, none
    # given a PMI rank, so each mpi4py world has one process.
    path = _write_config(digits, tmp_path, clients=3)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "OMPI_", "SLURM_"))}
    tasks = [subprocess.Popen(
        [sys.executable, "-m", "slidefed", "-q", "federate", "--config", str(path),
         "--set", f"backend={backend}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**env, "SLURM_STEP_NUM_TASKS": "3", "SLURM_NTASKS": "3",
             "SLURM_PROCID": str(task), "PYTHONPATH": str(REPO)})
        for task in range(3)]
    for task in tasks:
        _, stderr = task.communicate(timeout=TIMEOUT_S)
        assert task.returncode != 0
        assert message in stderr and "srun --mpi=pmi2 -n R" in stderr, stderr
    assert not (tmp_path / "unused").exists()  # nobody trained

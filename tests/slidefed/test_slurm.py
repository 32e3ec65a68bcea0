"""The reduced workflow (configs/ci.yaml) through a real one-node SLURM cluster started by
workflow/slurm/one_node.sh and the profile configs/slurm: every job a SLURM job, each
federation one job of a rank per hospital under `srun --mpi=pmi2`, and a plain `srun -n 2` of
the federation refused."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CLUSTER = REPO / "workflow" / "slurm" / "one_node.sh"
RULES = {"demo_cohort": 1, "preprocess": 2, "federate": 2, "evaluate": 2, "heatmap": 2,
         "results_report": 1}  # jobs per rule
ALGORITHMS = ("proxyfl", "regular")
HOSPITALS = ("hospital_a", "hospital_b")

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def _env() -> dict[str, str]:
    """The jobs inherit this environment (sbatch --export=ALL): the venv's slidefed first."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def cluster():
    """A one-node cluster for this module; stopped afterwards if this fixture started it.
    Skipped where it cannot start (not root, no apt-get), failed instead under CI."""
    reason = None
    if os.geteuid() != 0:
        reason = "starting a one-node SLURM cluster needs root"
    elif not (shutil.which("apt-get") or shutil.which("slurmctld")):
        reason = "no slurmctld and no apt-get to install it"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    was_up = subprocess.run([CLUSTER, "status"]).returncode == 0
    start = subprocess.run([CLUSTER], capture_output=True, text=True, timeout=600)
    assert start.returncode == 0, start.stdout + start.stderr
    yield
    if not was_up:
        subprocess.run([CLUSTER, "stop"], check=True, timeout=60)


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory) -> Path:
    """The reduced workflow through the profile, in a fresh working directory."""
    workdir = tmp_path_factory.mktemp("slurm_workflow")
    run = subprocess.run(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(workdir),
         "--profile", str(REPO / "configs" / "slurm"),
         "--configfile", str(REPO / "configs" / "ci.yaml"),
         # keep the jobs' SLURM logs to inspect them; poll sooner than a real cluster needs
         "--slurm-keep-successful-logs", "--slurm-init-seconds-before-status-checks", "5"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-4000:]
    return workdir


def _slurm_jobs(workdir: Path, rule: str) -> dict[str, Path]:
    """SLURM job id -> its log, for each job of ``rule`` (the plugin names a log by job id)."""
    logs = (workdir / ".snakemake" / "slurm_logs" / f"rule_{rule}").rglob("*.log")
    return {log.stem: log for log in logs}


def _job_facts(job_id: str) -> dict[str, str]:
    """``scontrol show job``'s Key=Value fields; a finished job stays there for MinJobAge."""
    shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True,
                           text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", shown))


def test_every_job_of_the_workflow_ran_as_a_slurm_job(slurm_run: Path) -> None:
    run_names = set()
    for rule, count in RULES.items():
        jobs = _slurm_jobs(slurm_run, rule)
        assert len(jobs) == count, (rule, jobs)
        for job_id, log in jobs.items():
            facts = _job_facts(job_id)
            assert facts["JobState"] == "COMPLETED", (rule, facts)
            assert facts["Partition"] == "cpu"
            assert facts["StdOut"] == str(log)
            assert facts["NumTasks"] == str(2 if rule == "federate" else 1), (rule, facts)
            run_names.add(facts["JobName"])
    assert len(run_names) == 1  # one workflow run: the plugin names every job by its run id
    out = slurm_run / "results" / "ci"
    for algorithm in ALGORITHMS:
        metrics = json.loads((out / "federation" / algorithm / "slide_metrics.json").read_text())
        for model in metrics.values():
            assert set(model["hospitals"]) == set(HOSPITALS)


def test_each_federation_was_one_world_of_a_rank_per_hospital(slurm_run: Path) -> None:
    logs = {log.parent.name: log for log in _slurm_jobs(slurm_run, "federate").values()}
    assert set(logs) == set(ALGORITHMS)
    for algorithm, slurm_log in logs.items():
        # the job's shell command, as the jobstep executor ran it inside the allocation
        assert "srun --mpi=pmi2 -n 2 slidefed federate" in slurm_log.read_text()
        federate_log = (slurm_run / "results" / "ci" / "logs" / f"federate_{algorithm}.log")
        # two ranks, each running one of the two clients: one MPI world of two processes
        assert f"{algorithm}: 2 clients (1 in this process" in federate_log.read_text()


@pytest.mark.parametrize("backend, message", [
    ("auto", "the launcher started 2 processes but none is an MPI rank"),
    ("mpi", "the launcher started 2 processes but each is an MPI world of size 1"),
])
def test_plain_srun_of_the_federation_stops_every_task(
    slurm_run: Path, tmp_path: Path, backend: str, message: str
) -> None:
    # The workflow's federate command, started by srun without --mpi=pmi2: two tasks, each
    # its own MPI world of one.
    out = tmp_path / "lonely"
    run = subprocess.run(
        ["srun", "-n", "2", "slidefed", "-q", "federate",
         "--config", str(REPO / "configs" / "slides_demo.yaml"),
         "--set", f"backend={backend}", "--set", "algorithm=regular",
         "--set", f"output_dir={out}",
         "--set", f"data.root={slurm_run / 'results' / 'ci' / 'preprocessed'}",
         "--set", f"data.hospitals=[{','.join(HOSPITALS)}]", "--set", "clients=2"],
        cwd=slurm_run, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert run.stderr.count(message) == 2, run.stderr  # one line from each task
    assert "srun --mpi=pmi2 -n R" in run.stderr
    assert not out.exists()  # nobody trained

"""An interrupted workflow resumes where it stopped: Snakemake reruns the federation job it
killed (its output incomplete, never taken as done), and the federation continues from its
last checkpoint instead of round 1."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
HOSPITALS = ("hospital_a", "hospital_b")
ROUNDS = 40  # ~0.1 s each: stopped at round 2, resumed for the rest


def _tiny_config(tmp_path: Path) -> tuple[Path, Path]:
    """configs/ci.yaml's cohort, ProxyFL only, for ROUNDS rounds with a checkpoint each."""
    out = tmp_path / "results"
    config = yaml.safe_load((REPO / "configs" / "ci.yaml").read_text())
    config.update({
        "output_dir": str(out),
        "hospitals": {h: str(out / "cohort" / h / "labels.csv") for h in HOSPITALS},
        "federation": {**config["federation"], "algorithms": ["proxyfl"],
                       "config": str(REPO / "configs" / "slides_demo.yaml"),
                       "set": [*config["federation"]["set"], f"rounds={ROUNDS}",
                               "checkpoint_every=1", f"eval_every={ROUNDS}"]},
    })
    config_file = tmp_path / "resume.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return config_file, out


def _checkpointed(run_dir: Path) -> int:
    """The latest round every hospital has a checkpoint of (0: none yet)."""
    return min(max((int(p.stem.split("_")[1]) for p in
                    (run_dir / "hospitals" / h / "checkpoints").glob("round_*.pt")), default=0)
               for h in HOSPITALS)


def _wait_for_checkpoint(run_dir: Path, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _checkpointed(run_dir) < 2:
        assert process.poll() is None, "the workflow ended before the federation checkpointed"
        assert time.monotonic() < deadline, f"no checkpoint under {run_dir} in {timeout_s} s"
        time.sleep(0.02)


@pytest.mark.slow
def test_an_interrupted_workflow_reruns_the_federation_from_its_checkpoint(tmp_path):
    config_file, out = _tiny_config(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-c2",
               "--configfile", str(config_file)]
    run_dir = out / "federation" / "proxyfl"

    first = subprocess.Popen([*command, "-q"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for_checkpoint(run_dir, first, timeout_s=600)
        # To the whole process group, as a terminal's Ctrl-C or a batch system's kill reaches
        # snakemake, mpiexec and the ranks alike.
        os.killpg(first.pid, signal.SIGTERM)
        first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode != 0
    assert not (run_dir / "summary.json").exists()

    dry = subprocess.run([*command, "-n"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "rule federate:" in dry.stdout + dry.stderr  # not taken as done
    assert "rule preprocess:" not in dry.stdout + dry.stderr  # its bags were finished

    second = subprocess.run([*command, "-q"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    log = (out / "logs" / "federate_proxyfl.log").read_text()
    started = re.search(r"rounds (\d+)-(\d+), output", log)
    assert started and 3 <= int(started[1]) < int(started[2]) == ROUNDS, log[-2000:]
    with (run_dir / "privacy.csv").open() as f:
        rounds = [int(row["round"]) for row in csv.DictReader(f)]
    assert sorted(rounds) == sorted(r for r in range(1, ROUNDS + 1) for _ in HOSPITALS)
    assert (run_dir / "slide_metrics.json").exists()

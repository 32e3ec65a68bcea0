"""Launch a Python command under ``mpiexec`` for tests, with a hang turned into a failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).parent / "mpiexec"  # the mpich wheel's, next to this Python


def run_mpiexec(ranks: int, *args: str,
                timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``mpiexec -n ranks python *args`` from the repository root; return the result and
    the time it ended. A run past ``timeout`` is killed with every rank and fails the test."""
    # The working tree first, so the test exercises this checkout whatever is installed.
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    command = [str(MPIEXEC), "-n", str(ranks), sys.executable, *args]
    # A session of its own, so that a hang can be ended with every rank, not just mpiexec.
    process = subprocess.Popen(
        command, cwd=REPO, env={**os.environ, "PYTHONPATH": pythonpath},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"mpiexec {' '.join(args)} hung for {timeout} s")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), time.time()

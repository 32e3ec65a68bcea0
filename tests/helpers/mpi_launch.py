"""Launch a Python command under ``mpiexec`` for tests, with a hang turned into a failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MPIEXEC = Path(sys.executable).parent / "mpiexec"  # the mpich wheel's, next to this Python


def start_mpiexec(ranks: int, *args: str,
                  env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start ``mpiexec -n ranks python *args`` from the repository root, ``env`` added to the
    environment, with stdout and stderr piped."""
    # The working tree first, so the test exercises this checkout whatever is installed.
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    command = [str(MPIEXEC), "-n", str(ranks), sys.executable, *args]
    # A session of its own, so that a hang can be ended with every rank, not just mpiexec.
    return subprocess.Popen(
        command, cwd=REPO, env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def wait_mpiexec(process: subprocess.Popen,
                 timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    """Wait for a ``start_mpiexec`` process; return its result and the time it ended. A run
    past ``timeout`` is killed with every rank and fails the test."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"mpiexec {' '.join(process.args[4:])} hung for {timeout} s")
    return (subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr),
            time.time())


def run_mpiexec(ranks: int, *args: str, timeout: float = 120,
                env: Mapping[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``mpiexec -n ranks python *args`` to its end (see ``start_mpiexec`` and
    ``wait_mpiexec``); return the result and the time it ended."""
    return wait_mpiexec(start_mpiexec(ranks, *args, env=env), timeout)

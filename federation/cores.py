"""The CPU cores this process may run on, which sizes MPI ranks and torch threads."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores in this process's affinity mask (what SLURM or ``taskset`` grant), or the
    machine's count where the platform has no affinity call."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1

"""Which device a process trains on: ``device: auto | cpu | cuda`` in the run config."""

from __future__ import annotations

import os

import torch

# Node-local rank announced by MPI launchers (MPICH/hydra, Open MPI, SLURM's srun).
_LOCAL_RANK_VARIABLES = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")


def resolve_device(name: str) -> torch.device:
    """``cpu``; ``cuda`` (refused without a GPU); ``auto``: a GPU when CUDA has one, else the
    CPU. Ranks sharing a node take its GPUs round-robin by node-local rank."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device = cuda, but torch sees no CUDA device on this machine")
    local = next((os.environ[v] for v in _LOCAL_RANK_VARIABLES if v in os.environ), "0")
    return torch.device("cuda", int(local) % torch.cuda.device_count())

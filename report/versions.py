"""The software that produced a report: Python, the platform and slidefed's dependencies."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("slidefed", "torch", "torchvision", "opacus", "timm", "numpy", "scikit-learn",
            "scipy", "h5py", "openslide-python", "openslide-bin", "mpi4py", "mpich",
            "snakemake", "matplotlib", "jinja2")


def software_versions() -> dict[str, str]:
    """Name -> version of Python, the platform and each of ``PACKAGES`` (``not installed``
    for one that is not)."""
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found

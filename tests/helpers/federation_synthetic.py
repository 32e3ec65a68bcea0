"""A tiny, easy, MNIST-format image data set for federation tests, written as idx files.

Each of the 10 classes is a fixed random 8x8 pattern; an image is its class's pattern plus
pixel noise, so a small MLP separates the classes within a few rounds. The files are read by
the real ``mnist`` reader (``data.name = mnist``, ``data.root = <directory>``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

NUM_CLASSES = 10
SIDE = 8


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_synthetic_digits(
    root: Path, train_per_class: int = 120, test_per_class: int = 100, seed: int = 0,
    noise: float = 60.0,
) -> Path:
    """Write train and t10k idx files under ``root``; returns ``root``. ``noise``: the pixel
    noise's standard deviation (a large one leaves a model little but memorising)."""
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0, 255, size=(NUM_CLASSES, SIDE, SIDE))
    root.mkdir(parents=True, exist_ok=True)
    for prefix, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.repeat(np.arange(NUM_CLASSES), per_class)
        rng.shuffle(labels)
        jitter = rng.normal(0, noise, size=(len(labels), SIDE, SIDE))
        images = np.clip(prototypes[labels] + jitter, 0, 255).astype(np.uint8)
        _write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
    return root


# What the tests' runs share by opt-in (non-private statistics, ``ReportConfig``): every
# model's held-out accuracy (and a slide run's validation AUC), and the timings.
OPTED_IN_REPORT = {"shared_metrics": ["*/test/accuracy", "*/validation/accuracy",
                                      "*/validation/auc"], "share_timings": True}


def small_config(data_root: Path, output_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A config dict for a fast run on the synthetic digits: 4 clients, 3 rounds, MLPs."""
    config: dict[str, Any] = {
        "algorithm": "proxyfl",
        "rounds": 3,
        "seed": 0,
        "clients": 4,
        "backend": "local",
        "threads": 1,
        "output_dir": str(output_dir),
        "checkpoint_every": 2,
        "data": {"name": "mnist", "root": str(data_root), "partition": "class_skew",
                 "p_major": 0.8, "samples_per_client": 96, "test_samples_per_client": 100},
        "model": {"private": "mlp", "proxy": "mlp"},
        "optim": {"batch_size": 32, "lr": 0.01},
        "dp": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-3,
               # q = 32/96: three steps a round keep the runs short
               "max_sample_rate": 0.5},
        # Opted in, as the benchmark configs: the tests read the run-level metrics and times.
        "report": dict(OPTED_IN_REPORT),
    }
    return with_overrides(config, overrides)


def with_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``config`` with each dotted key of ``overrides`` (``"dp.enabled"``) set, in place. An
    algorithm that cannot train with DP (joint) gets ``dp.enabled: false`` unless the
    overrides say otherwise, as the benchmark runner does."""
    from federation.catalog import WITHOUT_DP

    if overrides.get("algorithm") in WITHOUT_DP:
        config["dp"]["enabled"] = False
    for dotted, value in overrides.items():
        node = config
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return config


def run_killed_in_round(config: Any, monkeypatch: Any, killed: int = 3) -> None:
    """Run ``config`` and interrupt it in round ``killed`` (0-based), after the rows of the
    rounds before were written, as Ctrl-C would: what a resumed run must recover from."""
    import pytest

    from federation.algorithms import ALGORITHMS
    from federation.loop import run_federation

    cls = ALGORITHMS[config.algorithm]
    real_round = cls.run_round

    def interrupted(self, round):
        if round == killed:
            raise KeyboardInterrupt
        return real_round(self, round)

    monkeypatch.setattr(cls, "run_round", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_federation(config)
    monkeypatch.undo()

"""The files of a federation run directory: their names, CSV columns, and which config keys
matter when two runs are compared. Torch-free, so the report and the benchmark runner read
runs without importing the engine.

Layout (the contract in DESIGN.md)::

    config.yaml                  the resolved configuration
    metrics.csv                  round, client, model, split, metric, value
    privacy.csv                  round, client, epsilon, delta, unit (what ε protects:
                                 record, slide or patch), status (active; stopped once the
                                 next round would pass dp.epsilon_budget: ε is final)
    summary.json                 final results and where the time went
    checkpoints/latest.json      {"round": r}: the last complete checkpoint
    checkpoints/round_<r>/client_<k>.pt
    federate.log                 stdout and stderr of a run the benchmark ran under mpiexec
    hospitals/<name>/            what belongs to one hospital, written by its process only:
        splits.csv               its slides' train / validation / test split (slide data)
        models/<model>.pt        its final models (``federation.model_files``)
        slide_predictions.csv    ``slidefed evaluate``: its validation and test slides
        slide_metrics.json       ``slidefed evaluate``: its test-slide metrics
    slide_predictions.csv        ``slidefed evaluate``: every hospital's rows
    slide_metrics.json           ``slidefed evaluate``: per hospital and pooled
    cross_site.csv               ``slidefed evaluate``: shared models on every hospital

``federation.outputs`` writes them, ``federation.loop`` reads the CSV files back when it
resumes a finished run, ``federation.report`` reads finished runs, ``federation.benchmark``
decides which runs are finished.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CONFIG = "config.yaml"
METRICS = "metrics.csv"
PRIVACY = "privacy.csv"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
LATEST_CHECKPOINT = "latest.json"  # inside CHECKPOINTS
FEDERATE_LOG = "federate.log"
HOSPITALS = "hospitals"

METRICS_COLUMNS = ("round", "client", "model", "split", "metric", "value")
PRIVACY_COLUMNS = ("round", "client", "epsilon", "delta", "unit", "status")

# Dotted config keys, by what a difference in them means.
#
# EXECUTION_KEYS: how and where a run executes, not what it computes. The benchmark runner
# counts a finished run as done although these differ from what it plans now.
EXECUTION_KEYS = frozenset({"backend", "threads", "device", "checkpoint_every", "output_dir",
                            "slides.workers"})
# RESUMABLE_CHANGES: what may differ between a run and its resumption (``outputs``, on
# ``--resume``): how it executes, and for how long. output_dir is where the run is found;
# threads changes the order of float sums, so a resumed run would no longer give the
# uninterrupted run's numbers.
RESUMABLE_CHANGES = (EXECUTION_KEYS - {"output_dir", "threads"}) | {"rounds"}
# RUNNER_KEYS: what the benchmark runner sets per run; an override of one would contradict
# its --algorithms, --seeds, -o or --backend.
RUNNER_KEYS = frozenset({"algorithm", "seed", "output_dir", "backend"})
# RUN_ONLY_KEYS: what runs reported together may differ in (``report``): the algorithm and
# seed being compared, how they executed, how often they were evaluated and where the data
# lay. They must agree on every other key.
RUN_ONLY_KEYS = EXECUTION_KEYS | RUNNER_KEYS | {"eval_every", "data.root"}


def client_checkpoint(round: int, client: int) -> str:
    """Path, relative to ``CHECKPOINTS``, of one client's state after ``round`` rounds."""
    return f"round_{round:06d}/client_{client:04d}.pt"


def flatten_config(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested configuration mapping as ``{dotted key: value}``, e.g. ``{"dp.delta": 1e-5}``."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def read_rows(path: Path, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of every row of a run's CSV file, whose header must hold ``columns``.

    Raises ``FileNotFoundError``, ``csv.Error``/``UnicodeDecodeError`` for an unreadable file,
    and ``ValueError`` (``<path>: header lacks column(s) ...``) for a header without them.
    """
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: header lacks column(s) {', '.join(missing)}")
        return [(reader.line_num, row) for row in reader]

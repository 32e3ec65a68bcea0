"""The files of a federation run directory: their names, CSV columns, and which config keys
matter when two runs are compared. Torch-free, so the report and the benchmark runner read
runs without importing the engine.

Layout (the contract in DESIGN.md). The coordinator (the process of client 0) writes the
run-level files from what the hospitals send it: by default their ε only (the DP releases
themselves travel between hospitals) and the elements each sent; metrics and timings only by
opt-in (``report.shared_metrics``, ``report.share_timings``), non-private statistics that
``summary.json`` and the reports label so. Everything under ``hospitals/<name>/`` is written
by that hospital's own process only and is its private output, so a hospital's directory may
lie on its own disk (``output_dir`` of its process); of it, only the models that left during
training (``shared`` in the file: the proxy, FedAvg's model, ...) are meant for others, and
their files hold no decision of the hospital's (``federation.model_files``)::

    config.yaml                  the resolved configuration
    metrics.csv                  round, client, model, split, metric, value: the rows the
                                 hospitals share by opt-in (report.shared_metrics; empty
                                 by default)
    privacy.csv                  round, client, epsilon, delta, unit (what ε protects:
                                 record, slide or patch), status (active; stopped once the
                                 next round would pass dp.epsilon_budget: ε is final),
                                 relation (substitution: replace one unit, counts public),
                                 guarantee (theorem, or "DP-SGD steps only, not a
                                 guarantee" when the DP model distils from a non-DP one)
    summary.json                 final results (shared metrics), ε, the coordinator's wall
                                 time and, by opt-in, where every process's time went;
                                 ``non_private`` labels the opt-in statistics, or says
                                 "not shared"
    federate.log                 stdout and stderr of a run the benchmark ran under mpiexec
    hospitals/<name>/            what belongs to one hospital, written by its process only:
        metrics.csv              every metric of its models, training losses included
        privacy.csv              its ε, as in the run's privacy.csv
        checkpoints/run_config.yaml   the configuration its checkpoints were written under
        checkpoints/round_<r>.pt      its state after round r (one, or two while a new
                                      checkpoint is being committed)
        splits.csv               its slides' train / validation / test split (slide data)
        models/<model>.pt        its final models (``federation.model_files``)
        models/<model>.decision  its decision card (slides): the threshold chosen on its
                                 validation slides and the slide aggregator (a head fitted
                                 on its training slides): private, read by predict,
                                 evaluate and heatmap at this hospital
        slide_predictions.csv    ``slidefed evaluate``: its validation and test slides
        slide_metrics.json       ``slidefed evaluate``: its test-slide metrics
        audit_records.csv        hospital, set, record, label, membership: the images its
                                 audit calls members and non-members (``audit.holdout``,
                                 ``audit.canaries``; ``federation.audit.records``)
        audit.csv, audit.json    ``slidefed audit``: membership inference on its models
    slide_predictions.csv        ``slidefed evaluate``: every hospital's rows
    slide_metrics.json           ``slidefed evaluate``: per hospital and pooled
    cross_site.csv               ``slidefed evaluate``: shared models on every hospital,
                                 each with the testing hospital's own threshold
                                 (these three pool every hospital's private outputs: written
                                 only by an evaluation of every hospital, where one operator
                                 reads every directory, as on the demo's one machine; across
                                 sites each hospital evaluates its own, ``--hospital``, and
                                 publishes what it chooses; non-private statistics, labelled
                                 so by the results report)
    audit.csv, audit.json,       ``slidefed audit``: every hospital's rows (``federation.audit``),
    audit_roc.png                and the attack's ROC curves
    audit_shadows/shadow_<s>/    ``slidefed audit --attack lira``: its shadow runs, each a run
                                 directory of its own
    heatmaps.csv                 ``slidefed heatmap``: the heatmaps it drew last, each a
                                 ``hospitals/<name>/heatmaps/<model>/<slide_id>.png``

``federation.run_directory`` writes them, ``federation.loop`` reads the CSV files back when it
resumes a finished run, ``benchmarks.table`` reads finished runs, ``benchmarks.algorithms``
decides which runs are finished, ``federation.evaluation`` writes the slide-level files and
``report`` reads them.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

CONFIG = "config.yaml"
METRICS = "metrics.csv"
PRIVACY = "privacy.csv"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"  # inside a hospital's directory
CHECKPOINT_CONFIG = "run_config.yaml"  # inside CHECKPOINTS; not config.yaml, which marks a run
FEDERATE_LOG = "federate.log"
HOSPITALS = "hospitals"
SLIDE_PREDICTIONS = "slide_predictions.csv"
SLIDE_METRICS = "slide_metrics.json"
CROSS_SITE = "cross_site.csv"
HEATMAPS = "heatmaps.csv"

METRICS_COLUMNS = ("round", "client", "model", "split", "metric", "value")
PRIVACY_COLUMNS = ("round", "client", "epsilon", "delta", "unit", "status", "relation",
                   "guarantee")
AUDIT_RECORDS = "audit_records.csv"  # inside a hospital's directory
AUDIT_RECORDS_COLUMNS = ("hospital", "set", "record", "label", "membership")
AUDIT_CSV = "audit.csv"
AUDIT_JSON = "audit.json"
AUDIT_ROC = "audit_roc.png"
SHADOWS = "audit_shadows"  # LiRA's shadow runs, inside the audited run's directory
PREDICTION_COLUMNS = ("hospital", "slide_id", "split", "label", "score", "prediction", "model")
CROSS_SITE_KEYS = ("model_hospital", "model", "data_hospital", "slides")  # then each metric
HEATMAP_COLUMNS = ("hospital", "model", "slide_id", "split", "label", "score", "prediction",
                   "path")  # path relative to the run directory

# Dotted config keys, by what a difference in them means.
#
# EXECUTION_KEYS: how and where a run executes, not what it computes. The benchmark runner
# counts a finished run as done although these differ from what it plans now.
EXECUTION_KEYS = frozenset({"backend", "threads", "device", "checkpoint_every", "output_dir",
                            "slides.workers", "comm_timeout_s"})
# RESUMABLE_CHANGES: what may differ between a run and its resumption (``outputs``, on
# ``--resume``): how it executes, and for how long. output_dir is where the run is found;
# threads changes the order of float sums, so a resumed run would no longer give the
# uninterrupted run's numbers.
RESUMABLE_CHANGES = (EXECUTION_KEYS - {"output_dir", "threads"}) | {"rounds"}
# PER_PROCESS_KEYS: what the processes of one run may set each for itself, as hospitals with
# their own machines do: where its files and data lie, its hardware, how it was launched.
# Every other key must agree across the processes (``federation.run_directory.agree_on_start``).
PER_PROCESS_KEYS = frozenset({"output_dir", "data.root", "device", "slides.workers", "backend"})
# RUNNER_KEYS: what the benchmark runner sets per run; an override of one would contradict
# its --algorithms, --seeds, -o or --backend.
RUNNER_KEYS = frozenset({"algorithm", "seed", "output_dir", "backend"})
# RUN_ONLY_KEYS: what runs reported together may differ in (``report``): the algorithm and
# seed being compared, how they executed, how often they were evaluated and where the data
# lay, and which metrics and timings their hospitals shared. They must agree on every other key.
RUN_ONLY_KEYS = EXECUTION_KEYS | RUNNER_KEYS | {"eval_every", "data.root",
                                                 "report.shared_metrics",
                                                 "report.share_timings"}


def checkpoint_file(round: int) -> str:
    """Name, inside a hospital's ``CHECKPOINTS``, of its state after ``round`` rounds."""
    return f"round_{round:06d}.pt"


def checkpoint_rounds(directory: Path) -> list[int]:
    """The rounds of the checkpoints in ``directory`` (a hospital's ``CHECKPOINTS``), ascending.
    Each file is written under a temporary name and renamed, so one that is there is whole."""
    return sorted(int(p.stem.removeprefix("round_")) for p in directory.glob("round_*.pt"))


def has_checkpoint(run_dir: Path) -> bool:
    """Whether any hospital of the run in ``run_dir`` (all on this disk) holds a checkpoint."""
    return any(checkpoint_rounds(d) for d in (run_dir / HOSPITALS).glob(f"*/{CHECKPOINTS}"))


def config_hash(flat: Mapping[str, Any], ignore: Iterable[str] = ()) -> str:
    """A short fingerprint of a flattened configuration, leaving out the keys ``ignore``:
    what processes compare to know that they run the same configuration without sending it."""
    ignored = set(ignore)
    kept = {key: value for key, value in sorted(flat.items()) if key not in ignored}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


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

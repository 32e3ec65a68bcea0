"""A federation run's output directory: resolved config, metrics, privacy, summary, checkpoints.

Its layout, file names and CSV columns are defined in ``federation.run_files``. Hospitals do
not share a disk: the coordinator (the root process, which owns client 0) writes the
run-level files, and every process writes only the directories of its own hospitals —
their metrics, ε, checkpoints and models — and deletes only there. Every file is written
under a temporary name and renamed.

Checkpoints: after round r every process writes each of its hospitals'
``checkpoints/round_<r>.pt``, waits until every process has (a barrier), and only then
deletes its older ones. A run killed at any moment therefore leaves, in every hospital, a
checkpoint of one round they all have. At start every process tells every other what it
holds (``StartFacts``, one ``allgather``), and all decide alike (``agree_on_start``): the
last round every hospital has, or the same one-line error on every process when they cannot
agree (another configuration, a hospital without its checkpoints). The CSV rows of rounds
after that checkpoint are dropped on resume, so the resumed run writes them again exactly
once.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from federation import run_files
from federation.config import (
    ConfigError,
    FederationConfig,
    config_to_dict,
    dump_config,
    load_config,
)
from formats.atomic import atomic_path

log = logging.getLogger(__name__)

Row = Mapping[str, Any]


class StartFacts(NamedTuple):
    """What one hospital's process tells the others before a run starts, to agree on it.

    ``config_hash``: its configuration's fingerprint, ``run_files.PER_PROCESS_KEYS`` left out.
    ``rounds``: the rounds of its checkpoints. ``differences``: the keys in which the
    configuration differs from the one its checkpoints were written under. ``finished``:
    client 0 only, the coordinator's ``output_dir`` if it holds a finished run's summary.
    """

    config_hash: str
    rounds: tuple[int, ...]
    differences: tuple[str, ...]
    finished: str | None


class RunDirectory:
    """The files of one run under ``root``; ``is_root`` marks the coordinator's process."""

    def __init__(self, root: str | Path, *, is_root: bool) -> None:
        self.root = Path(root)
        self.is_root = is_root
        self.config_path = self.root / run_files.CONFIG
        self.metrics_path = self.root / run_files.METRICS
        self.privacy_path = self.root / run_files.PRIVACY
        self.summary_path = self.root / run_files.SUMMARY

    # ------------------------------------------------------------------ places

    def hospital_dir(self, name: str) -> Path:
        """The directory of the hospital (client) ``name``: only its own process writes there."""
        return self.root / run_files.HOSPITALS / name

    def checkpoint_dir(self, name: str) -> Path:
        return self.hospital_dir(name) / run_files.CHECKPOINTS

    def _csv_files(self, directory: Path) -> tuple[tuple[str, Path, tuple[str, ...]], ...]:
        """(row kind, path, columns) of the CSV files in ``directory``: the run's, or a
        hospital's."""
        return (("metrics", directory / run_files.METRICS, run_files.METRICS_COLUMNS),
                ("privacy", directory / run_files.PRIVACY, run_files.PRIVACY_COLUMNS))

    # ------------------------------------------------------------------ starting

    def check_writable(self) -> None:
        """Fail in one line, before any work, unless this process can write under ``root``."""
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"output_dir {self.root}: is a file, not a directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as error:
            raise ConfigError(f"output_dir {self.root}: cannot write there "
                              f"({error.strerror or error})") from None

    def start_facts(self, config: FederationConfig, name: str, *, coordinator: bool
                    ) -> StartFacts:
        """What this process holds of hospital ``name`` (the coordinator's: also whether a
        finished run is here), for ``agree_on_start``."""
        flat = run_files.flatten_config(config_to_dict(config))
        checkpoints = self.checkpoint_dir(name)
        rounds = tuple(run_files.checkpoint_rounds(checkpoints))
        differences: tuple[str, ...] = ()
        if rounds:
            saved = load_config(checkpoints / run_files.CHECKPOINT_CONFIG,
                                source=str(checkpoints / run_files.CHECKPOINT_CONFIG))
            differences = tuple(_differences(saved, config))
        finished = str(self.root) if coordinator and self.summary_path.is_file() else None
        return StartFacts(run_files.config_hash(flat, run_files.PER_PROCESS_KEYS), rounds,
                          differences, finished)

    def start(self, config: FederationConfig, names: Iterable[str]) -> None:
        """Begin a fresh run: delete the checkpoints of the hospitals ``names`` (this process's
        own) and write their headers and configuration; the coordinator also writes the run's
        config and headers and deletes an earlier summary."""
        directories = [self.root] if self.is_root else []
        for name in names:
            shutil.rmtree(self.checkpoint_dir(name), ignore_errors=True)
            self._write_checkpoint_config(name, config)
            directories.append(self.hospital_dir(name))
        for directory in directories:
            for _, path, columns in self._csv_files(directory):
                with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
                    csv.writer(handle).writerow(columns)
        if self.is_root:
            with atomic_path(self.config_path) as tmp:
                tmp.write_text(dump_config(config))
            self.summary_path.unlink(missing_ok=True)

    def resume(self, config: FederationConfig, names: Iterable[str], completed: int) -> None:
        """Continue after round ``completed`` (which every hospital has, ``agree_on_start``):
        drop the rows after it and the hospitals' other checkpoints, record ``config``."""
        directories = [self.root] if self.is_root else []
        for name in names:
            self._write_checkpoint_config(name, config)
            self.keep_only_checkpoint(name, completed)
            directories.append(self.hospital_dir(name))
        for directory in directories:
            for _, path, columns in self._csv_files(directory):
                _keep_rounds_up_to(path, completed, columns)
        if self.is_root:
            with atomic_path(self.config_path) as tmp:
                tmp.write_text(dump_config(config))
            self.summary_path.unlink(missing_ok=True)
        log.info("resuming %s after round %d", self.root, completed)

    def _write_checkpoint_config(self, name: str, config: FederationConfig) -> None:
        with atomic_path(self.checkpoint_dir(name) / run_files.CHECKPOINT_CONFIG) as tmp:
            tmp.write_text(dump_config(config))

    # ------------------------------------------------------------------ rows

    def append(self, rows: Iterable[Row], hospital: str | None = None) -> None:
        """Append rows (``row["file"]``: ``metrics`` or ``privacy``) to the run's CSV files
        (the coordinator's), or with ``hospital`` to that hospital's own."""
        rows = list(rows)
        directory = self.root if hospital is None else self.hospital_dir(hospital)
        for kind, path, columns in self._csv_files(directory):
            chosen = [row for row in rows if row["file"] == kind]
            if chosen:
                with open(path, "a", newline="") as handle:
                    writer = csv.writer(handle)
                    writer.writerows([_format(row[c]) for c in columns] for row in chosen)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        with atomic_path(self.summary_path) as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")

    # ------------------------------------------------------------------ checkpoints

    def save_client(self, round: int, name: str, state: Mapping[str, Any]) -> None:
        """Write hospital ``name``'s state after ``round`` rounds."""
        with atomic_path(self.checkpoint_dir(name) / run_files.checkpoint_file(round)) as tmp:
            torch.save(dict(state), tmp)

    def load_client(self, round: int, name: str) -> dict[str, Any]:
        path = self.checkpoint_dir(name) / run_files.checkpoint_file(round)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: checkpoint of hospital {name} is missing")
        return torch.load(path, weights_only=False)

    def keep_only_checkpoint(self, name: str, round: int) -> None:
        """Delete hospital ``name``'s checkpoints of other rounds than ``round``; call once
        every process holds its hospitals' checkpoint of ``round``."""
        for other in run_files.checkpoint_rounds(self.checkpoint_dir(name)):
            if other != round:
                (self.checkpoint_dir(name) / run_files.checkpoint_file(other)).unlink(
                    missing_ok=True)


def agree_on_start(facts: Sequence[StartFacts], names: Sequence[str], rounds: int, *,
                   resume: bool, force: bool) -> int:
    """The rounds completed, to continue after (0: a fresh run), from every hospital's
    ``facts`` (client order; ``names`` theirs). Every process calls this with the same
    arguments, so all continue alike or all raise the same one-line ``ConfigError``."""
    first = facts[0].config_hash
    for c, fact in enumerate(facts):
        if fact.config_hash != first:
            raise ConfigError(
                f"the process of hospital {names[c]} runs another configuration than that of "
                f"{names[0]} (fingerprint {fact.config_hash} vs {first}); every process must "
                "run the same one, apart from " + ", ".join(sorted(run_files.PER_PROCESS_KEYS)))
    checkpointed = [c for c, fact in enumerate(facts) if fact.rounds]
    if resume and checkpointed:
        return _resume_round(facts, names, rounds)
    if resume:
        log.info("--resume: no hospital holds a checkpoint; starting from round 1")
    elif checkpointed and not force:
        name = names[checkpointed[0]]
        raise ConfigError(
            f"hospital {name} holds a checkpointed run ({run_files.HOSPITALS}/{name}/"
            f"{run_files.CHECKPOINTS}); pass --resume to continue it, --force to overwrite it, "
            "or choose another output_dir")
    if facts[0].finished and not force:
        raise ConfigError(
            f"{facts[0].finished} holds the results of a finished run ({run_files.SUMMARY}); "
            "pass --force to overwrite them, or choose another output_dir")
    return 0


def _resume_round(facts: Sequence[StartFacts], names: Sequence[str], rounds: int) -> int:
    """The last round every hospital holds a checkpoint of, written under this configuration."""
    for c, fact in enumerate(facts):
        if fact.differences:
            raise ConfigError(
                f"--resume: the configuration differs from the one hospital {names[c]}'s "
                "checkpoints were written under: " + ", ".join(fact.differences))
    held = "; ".join(f"{name}: {', '.join(map(str, fact.rounds)) or 'none'}"
                     for name, fact in zip(names, facts, strict=True))
    common = set.intersection(*(set(fact.rounds) for fact in facts))
    if not common:
        raise ConfigError(
            f"--resume: the hospitals hold checkpoints of no common round ({held}); every "
            f"hospital must resume from the same round: restore the missing "
            f"{run_files.HOSPITALS}/<name>/{run_files.CHECKPOINTS}, or start afresh with "
            "--force")
    completed = max(common)
    if completed > rounds:
        raise ConfigError(f"--resume: the run is checkpointed at round {completed}, past "
                          f"rounds = {rounds}")
    return completed


def _format(value: Any) -> str:
    # repr keeps every digit of a float, so identical runs write identical files.
    return repr(value) if isinstance(value, float) else str(value)


def _keep_rounds_up_to(path: Path, completed: int, columns: tuple[str, ...]) -> None:
    """Drop the rows after round ``completed``; write the header ``columns``, so that a file
    from an older version gains its new columns (empty in its old rows)."""
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if int(row["round"]) <= completed]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _differences(saved: FederationConfig, current: FederationConfig) -> list[str]:
    """Dotted keys whose values differ, ignoring ``run_files.RESUMABLE_CHANGES``."""
    old = run_files.flatten_config(config_to_dict(saved))
    new = run_files.flatten_config(config_to_dict(current))
    return [f"{key} ({old[key]!r} -> {new[key]!r})" for key in old
            if key not in run_files.RESUMABLE_CHANGES and old[key] != new[key]]

"""A federation run's output directory: resolved config, metrics, privacy, summary, checkpoints.

Its layout, file names and CSV columns are defined in ``federation.run_files``. Only the root
process writes the CSV files, the config and the summary; every process writes the
checkpoints of its own clients. Every file is written under a temporary name and renamed,
and a checkpoint counts only once ``latest.json`` names it, which happens after every client's
file is in place; older checkpoints are deleted after that. A run killed at any moment
therefore leaves a complete checkpoint to resume from (or none), and the CSV rows of rounds
after it are dropped on resume, so the resumed run writes them again exactly once.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from federation import run_files
from federation.config import (
    ConfigError,
    FederationConfig,
    config_to_dict,
    dump_config,
    load_config,
)
from slidefed.atomic import atomic_path

log = logging.getLogger(__name__)


class RunDirectory:
    """The files of one run under ``root``; ``is_root`` marks the process that writes them."""

    def __init__(self, root: str | Path, *, is_root: bool) -> None:
        self.root = Path(root)
        self.is_root = is_root
        self.config_path = self.root / run_files.CONFIG
        self.metrics_path = self.root / run_files.METRICS
        self.privacy_path = self.root / run_files.PRIVACY
        self.summary_path = self.root / run_files.SUMMARY
        self.checkpoints = self.root / run_files.CHECKPOINTS
        self.latest_path = self.checkpoints / run_files.LATEST_CHECKPOINT

    # ------------------------------------------------------------------ starting

    def checkpoint_round(self) -> int | None:
        """The round of the last complete checkpoint, or None."""
        if not self.latest_path.is_file():
            return None
        return int(json.loads(self.latest_path.read_text())["round"])

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

    def start(self, config: FederationConfig, *, force: bool = False) -> None:
        """Begin a fresh run: write config and headers. A checkpointed or finished run here is
        refused unless ``force``, which deletes its checkpoints and summary first."""
        if not force and self.checkpoint_round() is not None:
            raise ConfigError(
                f"{self.root} holds a checkpointed run; pass --resume to continue it, --force "
                "to overwrite it, or choose another output_dir"
            )
        if not force and self.summary_path.is_file():
            raise ConfigError(
                f"{self.root} holds the results of a finished run ({run_files.SUMMARY}); pass "
                "--force to overwrite them, or choose another output_dir"
            )
        if not self.is_root:
            return
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.config_path) as tmp:
            tmp.write_text(dump_config(config))
        for path, columns in ((self.metrics_path, run_files.METRICS_COLUMNS),
                              (self.privacy_path, run_files.PRIVACY_COLUMNS)):
            with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
                csv.writer(handle).writerow(columns)
        self.summary_path.unlink(missing_ok=True)

    def resume(self, config: FederationConfig) -> int:
        """Check that ``config`` continues the run here and drop rows after its checkpoint.

        Returns the number of completed rounds to continue from.
        """
        completed = self.checkpoint_round()
        if completed is None:
            raise ConfigError(f"--resume: {self.root} holds no checkpoint to resume from")
        differences = _differences(load_config(self.config_path), config)
        if differences:
            raise ConfigError(
                f"--resume: the configuration differs from the run in {self.root}: "
                + ", ".join(differences)
            )
        if completed > config.rounds:
            raise ConfigError(
                f"--resume: {self.root} is checkpointed at round {completed}, past "
                f"rounds = {config.rounds}"
            )
        if self.is_root:
            with atomic_path(self.config_path) as tmp:
                tmp.write_text(dump_config(config))
            for path, columns in ((self.metrics_path, run_files.METRICS_COLUMNS),
                                  (self.privacy_path, run_files.PRIVACY_COLUMNS)):
                _keep_rounds_up_to(path, completed, columns)
            self.summary_path.unlink(missing_ok=True)
        log.info("resuming %s after round %d", self.root, completed)
        return completed

    # ------------------------------------------------------------------ rows

    def append(self, metrics: Iterable[Mapping[str, Any]], privacy: Iterable[Mapping[str, Any]]
               ) -> None:
        """Append rows to metrics.csv and privacy.csv (root process only)."""
        for path, columns, rows in ((self.metrics_path, run_files.METRICS_COLUMNS, metrics),
                                    (self.privacy_path, run_files.PRIVACY_COLUMNS, privacy)):
            rows = list(rows)
            if rows:
                with open(path, "a", newline="") as handle:
                    writer = csv.writer(handle)
                    writer.writerows([_format(row[c]) for c in columns] for row in rows)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        with atomic_path(self.summary_path) as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")

    # ------------------------------------------------------------------ checkpoints

    def hospital_dir(self, name: str) -> Path:
        """The directory of the hospital (client) ``name``: only its own process writes there."""
        return self.root / run_files.HOSPITALS / name

    def client_checkpoint(self, round: int, client: int) -> Path:
        return self.checkpoints / run_files.client_checkpoint(round, client)

    def save_client(self, round: int, client: int, state: Mapping[str, Any]) -> None:
        """Write one client's state for the checkpoint after ``round`` rounds."""
        with atomic_path(self.client_checkpoint(round, client)) as tmp:
            torch.save(dict(state), tmp)

    def load_client(self, round: int, client: int) -> dict[str, Any]:
        path = self.client_checkpoint(round, client)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: checkpoint of client {client} is missing")
        return torch.load(path, weights_only=False)

    def commit_checkpoint(self, round: int) -> None:
        """Mark the checkpoint after ``round`` complete and delete older ones (root only;
        call after every process saved its clients)."""
        with atomic_path(self.latest_path) as tmp:
            tmp.write_text(json.dumps({"round": round}) + "\n")
        keep = self.client_checkpoint(round, 0).parent
        for old in self.checkpoints.glob("round_*"):
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)


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

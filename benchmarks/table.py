"""Results table and plots of a set of federation runs (``slidefed report``).

The runs are the directories under ``runs_dir`` that hold a ``config.yaml``, as the benchmark
runner lays them out (``<algorithm>/seed_<s>/``) or in any other arrangement; a directory
without ``summary.json`` is an unfinished run and is left out with a warning. Each algorithm is
judged on the model its ``summary.json`` names (``reported_model``, set once per algorithm in
``federation.algorithms``: ProxyFL, FML and Regular by the private model, the others by the
shared one), so the report hard-codes no algorithm.

Statistics, in the order ProxyFL (Kalra et al., Nature Communications 2023, arXiv 2111.11343,
Fig. 3) reports them: a run's accuracy at a round is the mean over its clients' test
accuracies; an algorithm's is the mean over seeds of that, ± the sample standard deviation
over seeds (ddof 1; none for a single seed). The spread across clients (population std, as
in ``summary.json``) is given per run and averaged over seeds. ε likewise: mean over clients,
then over seeds; ``epsilon_max`` is the largest ε of any client in any seed.

Writes ``results.csv`` and ``results.md`` (one row per algorithm), ``accuracy.png`` (accuracy
against round, a line per algorithm with a band of ± one std over seeds) and, when any
algorithm trained with DP, ``epsilon.png`` (ε against round).

The accuracies are what the hospitals shared by opt-in (``report.shared_metrics``): computed
on their test data, not covered by DP, and labelled so (``NON_PRIVATE``) in the table and the
plot; a run whose hospitals kept them has none ("not shared", and no ``accuracy.png`` when
no run has any). ε is the DP release every hospital sends.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from federation import catalog, run_files
from federation.config import ConfigError, FederationConfig, config_to_dict, load_config
from federation.privacy.statement import NON_PRIVATE, NOT_SHARED, UNSTATED, epsilon_label
from formats.errors import one_line

log = logging.getLogger(__name__)

# How every number a hospital shared by opt-in is labelled where it is shown (summary.json,
# results.md, the HTML report): computed on a hospital's own data, it is not covered by DP.

# Dashes as well as colours: algorithms with equal ε (same sampling, noise and steps) draw the
# same curve, and dashes let the one beneath show through.
LINESTYLES = ("-", "--", "-.", ":")


class ReportError(ValueError):
    """Runs that cannot be reported; ``str()`` is one line naming the file and the problem."""


@dataclass(frozen=True)
class RunResult:
    """What the report needs of one finished run. ``accuracy`` and ``epsilon`` map a round to
    the per-client values (clients in order); ``epsilon`` is empty and ``delta`` nan for a run
    without DP."""

    directory: Path
    config: FederationConfig
    model: str
    accuracy: dict[int, np.ndarray]
    epsilon: dict[int, np.ndarray]
    delta: float
    statement: str = ""  # what its ε is (``privacy.statement.epsilon_label``); "" without DP

    @property
    def algorithm(self) -> str:
        return self.config.algorithm

    @property
    def seed(self) -> int:
        return self.config.seed


@dataclass(frozen=True)
class AlgorithmResult:
    """One row of the results table (``math.nan`` where a value does not exist)."""

    algorithm: str
    model: str
    accuracy_mean: float
    accuracy_std: float
    client_std: float
    epsilon_mean: float
    epsilon_max: float
    delta: float
    seeds: int
    rounds: int
    statement: str = ""


@dataclass(frozen=True)
class Curve:
    """An algorithm's value per round: mean over seeds and std over seeds (nan for one seed);
    ``label`` names it in a legend."""

    algorithm: str
    label: str
    rounds: np.ndarray
    mean: np.ndarray
    std: np.ndarray


# ---------------------------------------------------------------------------- reading


def read_run(directory: Path) -> RunResult:
    """Read one finished run's ``config.yaml``, ``summary.json``, ``metrics.csv`` and
    ``privacy.csv``; raises ``ReportError`` naming the file that is missing or garbled."""
    config = _read_config(directory / run_files.CONFIG)
    model = _read_reported_model(directory / run_files.SUMMARY)

    metrics_path = directory / run_files.METRICS
    by_round: dict[int, dict[int, float]] = {}
    present: set[str] = set()
    for line, row in _read_csv(metrics_path, run_files.METRICS_COLUMNS):
        # Every row is parsed, used or not: a garbled file is refused, not half read.
        round_, client = _round_and_client(metrics_path, line, row)
        value = _number(metrics_path, line, row["value"])
        present.add(row["model"])
        if (row["model"], row["split"], row["metric"]) == (model, "test", "accuracy"):
            by_round.setdefault(round_, {})[client] = value
    if not by_round:  # its hospitals did not share it (report.shared_metrics): "not shared"
        log.info("%s: no test accuracy of model %r (the model summary.json reports; models "
                 "present: %s): its hospitals did not share it (report.shared_metrics)",
                 metrics_path, model, sorted(present))

    privacy_path = directory / run_files.PRIVACY
    epsilon: dict[int, dict[int, float]] = {}
    deltas: set[float] = set()
    # the columns read here, so that runs written before privacy.csv had ``status`` still load
    statements: set[str] = set()
    for line, row in _read_csv(privacy_path, ("round", "client", "epsilon", "delta")):
        round_, client = _round_and_client(privacy_path, line, row)
        epsilon.setdefault(round_, {})[client] = _number(privacy_path, line, row["epsilon"])
        deltas.add(_number(privacy_path, line, row["delta"]))
        # runs written before privacy.csv stated its relation and guarantee say so
        statements.add(epsilon_label(row) if row.get("guarantee") else UNSTATED)

    return RunResult(directory, config, model, _by_client(by_round), _by_client(epsilon),
                     max(deltas) if deltas else math.nan, " / ".join(sorted(statements)))


def read_runs(runs_dir: Path) -> list[RunResult]:
    """Every finished run under ``runs_dir``, checked to be comparable: one run per
    (algorithm, seed), and the same settings apart from ``run_files.RUN_ONLY_KEYS``."""
    if not runs_dir.is_dir():
        raise ReportError(f"{runs_dir}: no such directory")
    runs = []
    for config_path in sorted(runs_dir.rglob(run_files.CONFIG)):
        if run_files.SHADOWS in config_path.relative_to(runs_dir).parts:
            continue  # an audit's LiRA shadows, not runs of the comparison
        if (config_path.parent / run_files.SUMMARY).is_file():
            runs.append(read_run(config_path.parent))
        else:
            log.warning("%s: unfinished (no summary.json); left out of the report",
                        config_path.parent)
    if not runs:
        raise ReportError(f"{runs_dir}: holds no finished run (a directory with config.yaml "
                          "and summary.json)")
    seen: dict[tuple[str, int], Path] = {}
    first: dict[str, tuple[Any, Path]] = {}  # each setting's value in the first run that has it
    for run in runs:
        key = (run.algorithm, run.seed)
        if key in seen:
            raise ReportError(f"{run.directory} and {seen[key]} are both {run.algorithm} with "
                              f"seed {run.seed}; keep one")
        seen[key] = run.directory
        for name, value in sorted(_setting(run.config).items()):
            reference, where = first.setdefault(name, (value, run.directory))
            if value != reference:
                raise ReportError(
                    f"{run.directory} has {name} = {value!r} but {where} has {reference!r}; "
                    "report runs of one setting together"
                )
    return runs


def _read_config(path: Path) -> FederationConfig:
    try:
        return load_config(path, source=str(path))
    except ConfigError as error:  # one line, naming the file
        raise ReportError(str(error)) from None


def _read_reported_model(path: Path) -> str:
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: missing") from None
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("reported_model"), str):
        raise ReportError(f"{path}: has no 'reported_model'")
    if summary["reported_model"] not in catalog.MODEL_NAMES:
        raise ReportError(f"{path}: reported_model {summary['reported_model']!r} is none of "
                          f"the engine's models {sorted(catalog.MODEL_NAMES)}")
    return summary["reported_model"]


def _read_csv(path: Path, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) pairs of a CSV file with (at least) ``columns``."""
    try:
        return run_files.read_rows(path, columns)
    except FileNotFoundError:
        raise ReportError(f"{path}: missing") from None
    except (csv.Error, UnicodeDecodeError) as error:
        raise ReportError(f"{path}: not a readable CSV file ({one_line(error)})") from None
    except ValueError as error:  # the header lacks a column
        raise ReportError(str(error)) from None


def _number(path: Path, line: int, text: str | None) -> float:
    try:
        return float(text)  # a short row gives None: a TypeError
    except (TypeError, ValueError):
        raise ReportError(f"{path}, line {line}: {text!r} is not a number") from None


def _integer(path: Path, line: int, text: str | None) -> int:
    value = _number(path, line, text)
    if not value.is_integer():
        raise ReportError(f"{path}, line {line}: {text!r} is not a whole number")
    return int(value)


def _round_and_client(path: Path, line: int, row: Mapping[str, str]) -> tuple[int, int]:
    return _integer(path, line, row["round"]), _integer(path, line, row["client"])


def _by_client(values: Mapping[int, Mapping[int, float]]) -> dict[int, np.ndarray]:
    return {r: np.array([by_client[c] for c in sorted(by_client)])
            for r, by_client in sorted(values.items())}


def _setting(config: FederationConfig) -> dict[str, Any]:
    """The config as flat dotted keys, without ``run_files.RUN_ONLY_KEYS``, and without
    ``dp.enabled`` for an algorithm that runs only without DP (the benchmark's joint)."""
    ignored = run_files.RUN_ONLY_KEYS | (
        {"dp.enabled"} if config.algorithm in catalog.WITHOUT_DP else set())
    return {key: value for key, value in run_files.flatten_config(config_to_dict(config)).items()
            if key not in ignored}


# ---------------------------------------------------------------------------- statistics


def _by_algorithm(runs: Iterable[RunResult]) -> dict[str, list[RunResult]]:
    groups: dict[str, list[RunResult]] = {}
    for run in sorted(runs, key=lambda r: (r.algorithm, r.seed)):
        groups.setdefault(run.algorithm, []).append(run)
    return groups


def _mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1) over seeds; the std is nan for one seed."""
    array = np.asarray(list(values), dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else math.nan


def _last(series: Mapping[int, np.ndarray]) -> np.ndarray:
    return series[max(series)]


def summarize(runs: Iterable[RunResult]) -> list[AlgorithmResult]:
    """One ``AlgorithmResult`` per algorithm (sorted by name), from the final round of each
    run."""
    results = []
    for algorithm, group in _by_algorithm(runs).items():
        # Only runs whose hospitals shared the accuracy (report.shared_metrics) have one.
        finals = [_last(run.accuracy) for run in group if run.accuracy]
        accuracy_mean, accuracy_std = _mean_std(f.mean() for f in finals) if finals \
            else (math.nan, math.nan)
        dp = [run for run in group if run.epsilon]
        results.append(AlgorithmResult(
            algorithm=algorithm,
            model=group[0].model,
            accuracy_mean=accuracy_mean,
            accuracy_std=accuracy_std,
            client_std=float(np.mean([f.std() for f in finals])) if finals else math.nan,
            epsilon_mean=float(np.mean([_last(r.epsilon).mean() for r in dp])) if dp else math.nan,
            epsilon_max=float(max(_last(r.epsilon).max() for r in dp)) if dp else math.nan,
            delta=max(r.delta for r in dp) if dp else math.nan,
            seeds=len(group),
            rounds=max(r.config.rounds for r in group),
            statement=" / ".join(sorted({r.statement for r in dp})),
        ))
    return results


def curves(runs: Iterable[RunResult], quantity: str) -> list[Curve]:
    """Per algorithm, ``quantity`` ("accuracy" or "epsilon") against round: the mean over
    clients, then mean and std over seeds, at the rounds every seed has. Algorithms without
    values of ``quantity`` (ε without DP) have no curve. An accuracy curve's label names the
    model it is of; ε is always the DP model's."""
    curves_ = []
    for algorithm, group in _by_algorithm(runs).items():
        series = [getattr(run, quantity) for run in group]
        if not all(series):
            continue
        rounds = sorted(set.intersection(*(set(s) for s in series)))
        per_seed = np.array([[s[r].mean() for r in rounds] for s in series])
        std = per_seed.std(axis=0, ddof=1) if len(series) > 1 else np.full(len(rounds), np.nan)
        label = f"{algorithm} ({group[0].model})" if quantity == "accuracy" else algorithm
        curves_.append(Curve(algorithm, label, np.array(rounds), per_seed.mean(axis=0), std))
    return curves_


# ---------------------------------------------------------------------------- writing


def write_table(results: list[AlgorithmResult], out_dir: Path, caption: str) -> list[Path]:
    """``results.csv`` (every field, full precision, empty for nan) and ``results.md`` (a
    Markdown table with ``caption`` under it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "results.csv", out_dir / "results.md"
    names = [f.name for f in fields(AlgorithmResult)]
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        for result in results:
            writer.writerow(["" if _is_nan(v) else v for v in (getattr(result, n) for n in names)])

    columns: list[tuple[str, Callable[[AlgorithmResult], str]]] = [
        ("Algorithm", lambda r: r.algorithm),
        ("Model", lambda r: r.model),
        ("Accuracy (non-private)", lambda r: NOT_SHARED if _is_nan(r.accuracy_mean)
         else f"{r.accuracy_mean:.3f}"
         + ("" if _is_nan(r.accuracy_std) else f" ± {r.accuracy_std:.3f}")),
        ("Std across clients", lambda r: NOT_SHARED if _is_nan(r.client_std)
         else f"{r.client_std:.3f}"),
        ("ε (mean over clients)", lambda r: _significant(r.epsilon_mean)),
        ("ε (max)", lambda r: _significant(r.epsilon_max)),
        ("δ", lambda r: _significant(r.delta)),
        ("What ε is", lambda r: r.statement or "—"),
        ("Seeds", lambda r: str(r.seeds)),
        ("Rounds", lambda r: str(r.rounds)),
    ]
    lines = ["| " + " | ".join(title for title, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in results]
    md_path.write_text("\n".join(lines) + f"\n\n{caption}\n")
    return [csv_path, md_path]


def plot_curves(curves_: list[Curve], path: Path, *, ylabel: str, title: str,
                styles: Mapping[str, Mapping[str, str]]) -> Path:
    """A line per curve with a band of ± one std over seeds, saved as PNG; ``styles`` gives
    each algorithm's ``color`` and ``linestyle``."""
    # Imported here, not at the top: it costs every ``slidefed`` command seconds at start-up.
    # Figure without pyplot draws with the Agg canvas and keeps no global state.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    for curve in curves_:
        style = styles[curve.algorithm]
        axes.plot(curve.rounds, curve.mean, linewidth=1.6, label=curve.label, **style)
        if not np.isnan(curve.std).all():
            axes.fill_between(curve.rounds, curve.mean - curve.std, curve.mean + curve.std,
                              color=style["color"], alpha=0.2, linewidth=0)
    axes.set_xlabel("round")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return path


def write_report(runs_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Table and plots of the finished runs under ``runs_dir``, written to ``out_dir``
    (default ``runs_dir``); returns the files written."""
    runs = read_runs(runs_dir)
    out_dir = runs_dir if out_dir is None else out_dir
    config = runs[0].config
    seeds = sorted({len(group) for group in _by_algorithm(runs).values()})
    seeds_text = "/".join(map(str, seeds)) + (" seed" if seeds == [1] else " seeds")
    setting = f"{config.data.name}, {config.clients} clients"

    results = summarize(runs)
    caption = (f"*{setting}. Accuracy: each algorithm's reported model, test accuracy after the "
               "final round, mean over clients, then mean ± std over seeds; std across clients "
               f"averaged over seeds: a {NON_PRIVATE} (report.shared_metrics), computed on "
               f"each hospital's test data and not covered by DP; \"{NOT_SHARED}\" where the "
               "hospitals kept it. ε after the final round (— without DP).*")
    written = write_table(results, out_dir, caption)

    # Styles by algorithm, so an algorithm looks the same in both plots.
    styles = {r.algorithm: {"color": f"C{i % 10}", "linestyle": LINESTYLES[i % len(LINESTYLES)]}
              for i, r in enumerate(results)}
    accuracy_curves = curves(runs, "accuracy")
    if accuracy_curves:
        written.append(plot_curves(
            accuracy_curves, out_dir / "accuracy.png",
            ylabel=f"test accuracy ({NON_PRIVATE})",
            title=f"{setting}: mean over clients ± std over {seeds_text}", styles=styles))
    else:
        log.info("no run's hospitals shared their test accuracy; no accuracy.png")
    dp_curves = curves(runs, "epsilon")
    if dp_curves:
        delta = max(r.delta for r in results if not _is_nan(r.delta))
        written.append(plot_curves(
            dp_curves, out_dir / "epsilon.png", ylabel=f"ε (δ = {delta:g})",
            title=f"{setting}: ε of the DP model, mean over clients ± std over {seeds_text}",
            styles=styles))
    else:
        log.info("no run trained with DP; no epsilon.png")
    log.info("report of %d runs: %s", len(runs), ", ".join(str(p) for p in written))
    return written


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _significant(value: float) -> str:
    return "—" if _is_nan(value) else f"{value:.3g}"

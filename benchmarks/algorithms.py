"""Benchmark runner: several algorithms × seeds of one configuration, then the report.

``run_benchmark`` runs ``slidefed federate``'s engine once per (algorithm, seed) into
``<out_dir>/<algorithm>/seed_<seed>/`` and writes the report of ``benchmarks.table``
(``results.csv``, ``results.md``, ``accuracy.png``, ``epsilon.png``) into ``out_dir``: the
comparison of ProxyFL's Fig. 3 (Kalra et al., Nature Communications 2023, arXiv 2111.11343).

It is resumable: a run whose ``summary.json`` exists with the same settings is skipped, and a
run with a checkpoint (killed, or finished with fewer ``rounds``) continues from it. Every
configuration is resolved and validated before the first run starts. A failed run does not
stop the others; the runner names the failed runs at the end and writes no report then.

How a run executes is chosen by backend in ``EXECUTORS``: ``local`` calls the round loop in
this process: a fresh interpreter per run would import torch and opacus again each time
(seconds, as long as a short run itself), and the runs are sequential, each one's models
freed when it returns; ``mpi`` starts ``mpiexec -n R python -m slidefed federate``, the K
clients packed on R ranks (default: one per core this process may use, at most K), its output
in the run's ``federate.log``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from benchmarks.table import write_report
from federation import catalog, run_files
from federation.config import (
    ConfigError,
    FederationConfig,
    config_to_dict,
    load_config,
    parse_override,
)
from federation.cores import usable_cores
from formats.errors import one_line

log = logging.getLogger(__name__)


class BenchmarkError(ValueError):
    """A benchmark that cannot start or whose runs failed; ``str()`` is one line."""


@dataclass(frozen=True)
class PlannedRun:
    """One (algorithm, seed) of a benchmark: the file and overrides that configure it, and the
    configuration they resolve to."""

    config_path: Path
    overrides: tuple[str, ...]
    config: FederationConfig

    @property
    def directory(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def name(self) -> str:
        return f"{self.config.algorithm}/seed_{self.config.seed}"


def plan_runs(
    config_path: Path,
    algorithms: Sequence[str],
    seeds: Sequence[int],
    out_dir: Path,
    backend: str,
    overrides: Iterable[str] = (),
) -> list[PlannedRun]:
    """Resolve and validate every run's configuration (a bad name or value fails here, before
    anything runs). Algorithms that cannot train with DP (``catalog.WITHOUT_DP``) run with
    ``dp.enabled=false``."""
    overrides = tuple(overrides)
    for override in overrides:
        key, _ = parse_override(override)
        if key in run_files.RUNNER_KEYS:
            raise BenchmarkError(f"--set {override}: the benchmark sets {key} itself "
                                 "(use --algorithms, --seeds, -o or --backend)")
    for what, values in (("algorithm", algorithms), ("seed", seeds)):
        if not values:
            raise BenchmarkError(f"no {what} to run")
        repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
        if repeated:
            raise BenchmarkError(f"{what} {', '.join(repeated)} given more than once")
    plan = []
    for algorithm in algorithms:
        for seed in seeds:
            run_overrides = (*overrides, f"algorithm={algorithm}", f"seed={seed}",
                             f"output_dir={out_dir / algorithm / f'seed_{seed}'}",
                             f"backend={backend}")
            if algorithm in catalog.WITHOUT_DP:  # the non-private reference, e.g. joint
                run_overrides += ("dp.enabled=false",)
            plan.append(PlannedRun(config_path, run_overrides,
                                   load_config(config_path, run_overrides)))
    return plan


def run_benchmark(
    config_path: Path,
    algorithms: Sequence[str],
    seeds: Sequence[int],
    out_dir: Path,
    backend: str = "local",
    overrides: Iterable[str] = (),
    ranks: int | None = None,
) -> list[Path]:
    """Run every (algorithm, seed) not finished yet, then write the report into ``out_dir``.

    ``overrides`` are ``KEY=VALUE`` settings applied to every run (e.g. ``rounds=30``).
    ``ranks``: the MPI ranks of each run with backend ``mpi`` (default ``default_ranks``).
    Returns the run directories; raises ``BenchmarkError`` naming the runs that failed.
    """
    try:
        execute = EXECUTORS[backend]
    except KeyError:
        raise BenchmarkError(f"unknown backend {backend!r}; choose one of "
                             f"{sorted(EXECUTORS)}") from None
    if ranks is not None:
        if backend != "mpi":
            raise BenchmarkError(f"--ranks {ranks} needs --backend mpi")
        execute = functools.partial(execute, ranks=ranks)
    plan = plan_runs(config_path, algorithms, seeds, out_dir, backend, overrides)
    if ranks is not None and not all(1 <= ranks <= run.config.clients for run in plan):
        raise BenchmarkError(f"--ranks {ranks}: each run needs 1 to "
                             f"{min(run.config.clients for run in plan)} ranks (its clients)")
    failures = []
    with logging_redirect_tqdm():
        bar = tqdm(plan, desc="benchmark", unit="run")
        for run in bar:
            bar.set_postfix_str(run.name, refresh=True)
            if _is_finished(run):
                log.info("%s: finished earlier; skipped", run.name)
                continue
            resume = run_files.has_checkpoint(run.directory)
            started = time.perf_counter()
            try:
                execute(run, resume)
            except Exception as error:  # one failed run must not lose the others
                log.error("%s failed: %s", run.name, error, exc_info=log.isEnabledFor(
                    logging.DEBUG))
                failures.append(f"{run.name} ({one_line(error)})")
                continue
            log.info("%s: done in %.0f s", run.name, time.perf_counter() - started)
    if failures:
        raise BenchmarkError(
            f"{len(failures)} of {len(plan)} runs failed: {'; '.join(failures)}. Finished runs "
            f"are kept: run the same command again to retry, or `slidefed report {out_dir}` "
            "for a report of the finished ones"
        )
    write_report(out_dir)
    return [run.directory for run in plan]


# ---------------------------------------------------------------------------- a run's state


def _comparable(config: FederationConfig) -> dict[str, Any]:
    return {key: value for key, value in run_files.flatten_config(config_to_dict(config)).items()
            if key not in run_files.EXECUTION_KEYS}


def _is_finished(run: PlannedRun) -> bool:
    """``summary.json`` exists and the run had the settings planned now."""
    if not (run.directory / run_files.SUMMARY).is_file():
        return False
    try:
        earlier = load_config(run.directory / run_files.CONFIG)
    except ConfigError as error:
        log.warning("%s: %s; running it again", run.name, error)
        return False
    return _comparable(earlier) == _comparable(run.config)


# ---------------------------------------------------------------------------- executors


def _run_in_process(run: PlannedRun, resume: bool) -> None:
    from federation.loop import run_federation  # imports torch

    run_federation(run.config, resume=resume)


def _mpiexec() -> Path:
    """The mpiexec beside this Python (the ``mpich`` wheel's), else the one on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file():
        return beside
    found = shutil.which("mpiexec")
    if found is None:
        raise BenchmarkError(f"no mpiexec beside {sys.executable} or on PATH; install the "
                             "mpich wheel or use --backend local")
    return Path(found)


def default_ranks(clients: int) -> int:
    """MPI ranks for a run of ``clients`` clients: one per core this process may use, at most
    one per client (more ranks than cores only add start-up: each imports torch and opacus)."""
    return min(clients, usable_cores())


def _run_under_mpiexec(run: PlannedRun, resume: bool, ranks: int | None = None) -> None:
    ranks = ranks or default_ranks(run.config.clients)
    command = [str(_mpiexec()), "-n", str(ranks), sys.executable, "-m",
               "slidefed", "federate", "--config", str(run.config_path)]
    command += [part for override in run.overrides for part in ("--set", override)]
    command += ["--resume"] if resume else []
    run.directory.mkdir(parents=True, exist_ok=True)
    log_path = run.directory / run_files.FEDERATE_LOG
    with open(log_path, "a") as handle:
        handle.write(" ".join(command) + "\n")
        handle.flush()
        result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=handle,
                                stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        raise BenchmarkError(f"mpiexec exited with status {result.returncode}; see {log_path}")


EXECUTORS: dict[str, Callable[[PlannedRun, bool], None]] = {
    "local": _run_in_process,
    "mpi": _run_under_mpiexec,
}


# ---------------------------------------------------------------------------- command line


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _seeds(text: str) -> list[int]:
    try:
        return [int(seed) for seed in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated whole numbers, got {text!r}") from None


def run_bench_algorithms(args: argparse.Namespace) -> int:
    if args.algorithms is None:
        args.algorithms = sorted(catalog.ALGORITHMS)
    run_benchmark(args.config, args.algorithms, args.seeds, args.output, backend=args.backend,
                  overrides=args.set, ranks=args.ranks)
    print(f"{len(args.algorithms)} algorithms x {len(args.seeds)} seeds -> "
          f"{args.output / 'results.md'}")
    print((args.output / "results.md").read_text().split("\n\n")[0])
    return 0


def run_report(args: argparse.Namespace) -> int:
    out_dir = args.output or args.runs_dir
    write_report(args.runs_dir, out_dir)
    print((out_dir / "results.md").read_text().split("\n\n")[0])
    return 0


def register(commands: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Add ``slidefed bench algorithms`` and ``slidefed report`` to the ``slidefed`` parser."""
    p = bench.add_parser(
        "algorithms",
        help="federate several algorithms x seeds of one config; table and plots of the results",
    )
    p.add_argument("--config", type=Path, required=True, help="run configuration (YAML)")
    p.add_argument("--algorithms", type=_names, default=None,
                   help="comma-separated, e.g. proxyfl,fedavg,regular (default: all)")
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2, 3, 4],
                   help="comma-separated (default 0,1,2,3,4: the paper's five runs)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a dotted config key in every run, e.g. --set rounds=30 "
                        "(repeatable)")
    p.add_argument("--backend", choices=sorted(EXECUTORS), default="local",
                   help="local: each run in this process (default); mpi: each run under "
                        "mpiexec, its clients packed on --ranks ranks")
    p.add_argument("--ranks", type=int, default=None, metavar="R",
                   help="with --backend mpi: MPI ranks per run, 1..clients (default: the "
                        "cores available, at most one per client)")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="directory of the runs (<algorithm>/seed_<s>/) and the report")
    p.set_defaults(run=run_bench_algorithms)

    p = commands.add_parser("report", help="results table and plots of finished federation runs")
    p.add_argument("runs_dir", type=Path, metavar="RUNS_DIR",
                   help="directory holding run directories (any depth)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="where to write results.csv/.md and the plots (default RUNS_DIR)")
    p.set_defaults(run=run_report)

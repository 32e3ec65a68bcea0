"""The ``slidefed`` console script: one parser, subcommands registered by each package.

Each subcommand is a thin wrapper over a library function, so notebooks, Snakemake rules and
the command line all run the same code. Errors print as one line, ``error: <what>: <why>``,
and exit non-zero.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from benchmarks import commands as benchmark_commands
from federation import commands as federation_commands
from formats.errors import one_line
from preprocessing import commands as preprocessing_commands
from report import commands as report_commands
from slidefed import commands as slidefed_commands


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full ``slidefed`` parser."""
    parser = OneLineErrorParser(
        prog="slidefed", description="Federated, differentially private cancer diagnosis on "
        "whole-slide images: tile slides into patch bags, train ProxyFL and its baselines.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=OneLineErrorParser)
    bench = commands.add_parser(
        "bench", help="benchmarks: speed against same-run baselines, algorithms across seeds")
    bench_commands = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK",
                                          parser_class=OneLineErrorParser)
    preprocessing_commands.register(commands, bench_commands)
    federation_commands.register(commands, bench_commands)
    slidefed_commands.register(commands, bench_commands)
    report_commands.register(commands)
    benchmark_commands.register(commands, bench_commands)
    return parser


def _terminate(signum: int, frame: object) -> NoReturn:
    # SIGTERM (kill, SLURM, Snakemake) unwinds like Ctrl-C so partial files are deleted.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``slidefed`` console script."""
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        # Bad slides, bags, slide lists, configs, values and output paths: one line, unless
        # debugging.
        if args.verbose:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1


def console_main() -> NoReturn:
    """The ``slidefed`` console script: ``main()``, then exit without interpreter teardown.

    By the time ``main`` returns, every output is closed and renamed into place. What is left
    is unloading torch, opacus and their compiled extensions, which costs ~0.65 CPU-s per
    process (``import torch, opacus``: 2.9 s with a normal exit, 2.2 s with ``os._exit``, on
    the 2-core machine) and 3-4 s of wall time when 8 MPI ranks share 2 cores. So this
    flushes what Python buffers (streams, logging handlers), finalises MPI if a command
    started it (mpiexec expects every rank to), and leaves with ``os._exit``.
    """
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")  # never import (and so initialise) MPI here
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)

"""``slidefed bench NAME``: every speed and accuracy benchmark behind one launcher.

Each benchmark measures against a baseline in the same run and prints JSON (or, for
``algorithms``, writes a table); ``benchmarks/README.md`` says what each measures against
what. Heavy imports happen inside each command, so registering them costs ``slidefed``'s
start-up nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable
from pathlib import Path

from benchmarks import algorithms, options
from preprocessing.commands import add_tiling_arguments, positive_int, tiling_options


def run_bench_tiling(args: argparse.Namespace) -> int:
    from benchmarks.tiling import bench_tiling

    print(json.dumps(bench_tiling(args.slide, tiling_options(args), workers=args.workers)))
    return 0


def run_bench_encodings(args: argparse.Namespace) -> int:
    from benchmarks.tiling import bench_encodings

    for row in bench_encodings(args.slide, tiling_options(args)):
        print(json.dumps(row))
    return 0


def run_bench_predict(args: argparse.Namespace) -> int:
    from benchmarks.predict import bench_predict
    from federation.evaluation.scoring import SCORING_BATCH

    print(json.dumps(bench_predict(args.model, args.slides, device=args.device,
                                   batch_size=args.batch_size or SCORING_BATCH,
                                   workers=args.workers, readers=args.readers,
                                   repeats=args.repeats)))
    return 0


# The benchmarks whose options live in their own module (also ``python -m benchmarks.<name>``).
_MODULES = {
    "dp": ("dp", "DP-SGD step time of each clipping mechanism against a non-private step",
           options.add_dp_arguments),
    "bags": ("bags", "reading patch bags for training against an in-memory baseline",
             options.add_bags_arguments),
    "comm": ("comm", "flat-buffer exchange against pickled state_dicts (under mpiexec -n 2)",
             options.add_comm_arguments),
    "federation": ("federation_speed",
                   "FedAvg against plain training, ProxyFL under MPI, and packing clients on "
                   "ranks", options.add_federation_arguments),
    "guarantee-cost": ("guarantee_cost", "ProxyFL's guaranteed proxy (dml.beta 0) against the "
                       "paper's (0.5) on the same test slides, paired, over seeds",
                       options.add_guarantee_cost_arguments),
    "demo-table": ("demo_table", "the demo's results table, from a finished workflow run",
                   options.add_demo_table_arguments),
}


def _command_of(module: str) -> Callable[[argparse.Namespace], int]:
    """``benchmarks.<module>.command``, imported when the benchmark runs."""

    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(f"benchmarks.{module}").command(args)

    return run


def register(commands: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Add every ``slidefed bench NAME`` and ``slidefed report`` to the ``slidefed`` parser."""
    algorithms.register(commands, bench)  # slidefed bench algorithms, slidefed report
    for name, (module, help_text, add_arguments) in _MODULES.items():
        p = bench.add_parser(name, help=help_text)
        add_arguments(p)
        p.set_defaults(run=_command_of(module))

    p = bench.add_parser("tiling", help="slidefed tile vs bare OpenSlide read_region")
    p.add_argument("slide", type=Path, help="slide file")
    p.add_argument("--workers", type=positive_int, default=2,
                   help="workers for the speed-up measurement (default 2)")
    add_tiling_arguments(p)
    p.set_defaults(run=run_bench_tiling)

    p = bench.add_parser("encodings", help="size, speed and error of each patch encoding")
    p.add_argument("slide", type=Path, help="slide file")
    add_tiling_arguments(p)
    p.set_defaults(run=run_bench_encodings)

    p = bench.add_parser("predict", help="slidefed predict's throughput vs the bare forward pass")
    p.add_argument("--model", type=Path, required=True, help="model file")
    p.add_argument("slides", type=Path, nargs="+", metavar="SLIDE", help="slide files")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                   help="where the model runs (default %(default)s)")
    p.add_argument("--batch-size", type=positive_int,
                   help="patches per forward pass (default: as slidefed evaluate)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="tiling processes of the predict variants (default %(default)s)")
    p.add_argument("--readers", type=positive_int,
                   help="threads that read and decode the next batches while the model runs "
                        "(default: one per core, at most 4)")
    p.add_argument("--repeats", type=positive_int, default=5,
                   help="interleaved repeats; the best and the median are reported "
                        "(default %(default)s)")
    p.set_defaults(run=run_bench_predict)

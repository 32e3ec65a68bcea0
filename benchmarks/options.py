"""The options of the benchmarks that ``slidefed bench`` launches and ``python -m
benchmarks.<name>`` runs alike, kept torch-free so that building the ``slidefed`` parser imports
no benchmark."""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMM_MODELS = ("mlp", "resnet18")  # benchmarks.comm.BENCH_MODELS
FEDERATION_BENCHMARKS = ("fedavg_vs_plain", "proxyfl_mpi", "packing")
FEDERATION_CONFIG = REPO / "configs" / "benchmarks" / "fashion_mnist.yaml"


def _workers(text: str) -> list[int]:
    return [int(w) for w in text.split(",")]


def add_dp_arguments(parser: argparse.ArgumentParser) -> None:
    """``slidefed bench dp``'s options."""
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=300, help="run length for the ε timing")
    parser.add_argument("--epsilon-calls", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slides", type=int, default=0, help="time slide-level DP instead")
    parser.add_argument("--patches-per-slide", type=int, default=16)


def add_bags_arguments(parser: argparse.ArgumentParser) -> None:
    """``slidefed bench bags``'s options."""
    parser.add_argument("--cohort", help="a hospital's preprocessing output (default: build "
                                         "a synthetic one)")
    parser.add_argument("--slides", type=int, default=8, help="slides of the built cohort")
    parser.add_argument("--size", type=int, default=4096,
                        help="side of each built slide, µm (the demo cohort's size_um)")
    parser.add_argument("--workers", type=_workers, default=[0, 2],
                        help="DataLoader workers of each bag variant (default 0,2)")
    parser.add_argument("--slides-per-step", type=int, default=8)
    parser.add_argument("--patches-per-slide", type=int, default=16)
    parser.add_argument("--augment", choices=("hed", "none"), default="none",
                        help="stain augmentation, the same in every variant (default none: "
                             "time the data path alone)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)


def add_comm_arguments(parser: argparse.ArgumentParser) -> None:
    """``slidefed bench comm``'s options."""
    parser.add_argument("--models", nargs="+", default=list(COMM_MODELS),
                        choices=COMM_MODELS)
    parser.add_argument("--repeats", type=int, default=20)


def add_federation_arguments(parser: argparse.ArgumentParser) -> None:
    """``slidefed bench federation``'s options."""
    parser.add_argument("--config", type=Path, default=FEDERATION_CONFIG)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--ranks", type=int, default=None,
                        help="ranks the clients are packed on in 'packing' (default: the "
                             "cores this process may use, at most one per client)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", action="append", choices=FEDERATION_BENCHMARKS,
                        help="run only this benchmark (repeatable; default: all)")


def add_guarantee_cost_arguments(parser: argparse.ArgumentParser) -> None:
    """``slidefed bench guarantee-cost``'s options."""
    parser.add_argument("--config", type=Path, required=True,
                        help="slide federation configuration (e.g. configs/slides_demo.yaml)")
    parser.add_argument("--seeds", default="0,1,2",
                        help="comma-separated seeds (default %(default)s)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="override a config key in every run, e.g. "
                             "--set data.root=results/demo/preprocessed (repeatable)")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="directory of the runs (beta_<β>/seed_<s>/) and of table.md")


def add_demo_table_arguments(parser: argparse.ArgumentParser) -> None:
    """``slidefed bench demo-table``'s options."""
    parser.add_argument("out_dir", type=Path, help="a finished workflow's output_dir "
                                                   "(e.g. results/demo)")

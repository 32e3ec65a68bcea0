"""Time whole federation runs against their speed targets and a plain PyTorch reference.

In ProxyFL's Fashion-MNIST setting (``configs/benchmarks/fashion_mnist.yaml``: 8 clients x
1,000 images, 784-200-200-10 MLP private and proxy, batch 250, σ = 1, C = 1, p_major 0.8):

1. ``proxyfl_mpi``: ``mpiexec -n 8 slidefed federate`` for ``--rounds`` rounds, wall time
   from launch to exit (start-up included), with DP and, for the DP overhead, without.
2. ``fedavg_vs_plain``: FedAvg without DP on the local backend (``run_federation``, one
   process) against ``plain_fedavg`` — the same training written as a bare PyTorch loop over
   the same tensors — timed in the same process; and the start-up of a process that imports
   what ``slidefed federate`` imports.
3. ``packing``: ProxyFL with DP evaluated as the paper's public code evaluates (every client
   on the whole 10,000-image test set every round: ``data.test_distribution=global``,
   ``data.test_samples_per_client=10000``), once with one rank per client and once with the
   clients packed on ``--ranks`` ranks (default: the cores this process may use). Each wall
   time, launch to exit, is also given in units of the wall time of a fresh
   ``python -c "import torch, opacus"`` measured in the same run (the median of three), so
   that machines of different speeds can be compared; and where the time went (start-up,
   set-up, training, evaluation, communication, accounting), and whether both wrote the same
   metrics.

Run ``python -m benchmarks.federation_speed [--rounds 30] [--only packing]``; it prints one
JSON object. Both runs of a pair use the same torch thread count (``--threads``, default 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from benchmarks.algorithms import default_ranks
from benchmarks.options import FEDERATION_BENCHMARKS, add_federation_arguments
from federation import run_files
from federation.config import FederationConfig, load_config
from federation.data import load_client_data
from federation.data.image_clients import ImageClientData
from federation.loop import run_federation
from federation.models import create_model
from federation.seeds import derive_seed

REPO = Path(__file__).resolve().parents[1]


def plain_fedavg(
    config: FederationConfig, data: dict[int, ImageClientData]
) -> list[float]:
    """FedAvg as a bare PyTorch loop: the reference the engine is timed against.

    The same training as ``algorithm: fedavg`` with ``dp.enabled: false`` and every client
    sampled: K models from one initialisation, each with its own Adam; per round each client
    takes one shuffled pass in batches of B, then all adopt the data-weighted average. Returns
    the final test accuracy per client.
    """
    optim = config.optim
    models = [create_model(config.model.proxy, num_classes=client.num_classes,
                           seed=derive_seed(config.seed, "init", "shared"),
                           **client.model_options())
              for client in data.values()]
    optimizers = [torch.optim.Adam(m.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
                  for m in models]
    weights = torch.tensor([float(d.num_units) for d in data.values()])
    weights /= weights.sum()
    generator = torch.Generator().manual_seed(config.seed)
    for _ in range(config.rounds):
        for model, optimizer, client in zip(models, optimizers, data.values(), strict=True):
            x, y = client.train.tensors
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), optim.batch_size):
                index = order[start:start + optim.batch_size]
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[index]), y[index]).backward()
                optimizer.step()
        with torch.no_grad():
            average = sum(w * parameters_to_vector(m.parameters())
                          for w, m in zip(weights, models, strict=True))
            for model in models:
                vector_to_parameters(average, model.parameters())
    accuracies = []
    with torch.no_grad():
        for model, client in zip(models, data.values(), strict=True):
            x, y = client.test.tensors
            accuracies.append(float((model(x).argmax(1) == y).float().mean()))
    return accuracies


class Timing(NamedTuple):
    """Wall seconds of a command, and the CPU seconds (user + system) of all its processes."""

    wall: float
    cpu: float


def _launch(command: list[str]) -> Timing:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr[-2000:]}")
    return Timing(seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)


def _federate_command(config: Path, out: Path, rounds: int, threads: int,
                      *settings: str) -> list[str]:
    command = [sys.executable, "-m", "slidefed", "-q", "federate", "--config",
               str(config), "--set", f"rounds={rounds}", "--set", f"output_dir={out}",
               "--set", f"threads={threads}", "--set", "checkpoint_every=0",
               # the benchmark reads the run's timings, which hospitals share by opt-in only
               "--set", "report.share_timings=true"]
    for setting in settings:
        command += ["--set", setting]
    return command


def bench_proxyfl_mpi(config: Path, rounds: int, ranks: int, threads: int,
                      work: Path) -> dict[str, float]:
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    result = {}
    for label, dp in (("dp", "true"), ("no_dp", "false")):
        out = work / f"proxyfl_{label}"
        command = [mpiexec, "-n", str(ranks),
                   *_federate_command(config, out, rounds, threads, f"dp.enabled={dp}",
                                      "algorithm=proxyfl", "backend=mpi")]
        result[f"{label}_wall_s"] = round(_launch(command).wall, 2)
        summary = json.loads((out / run_files.SUMMARY).read_text())
        result[f"{label}_training_s"] = round(summary["time"]["training_s"], 2)
        result[f"{label}_in_run_wall_s"] = round(summary["time"]["wall_s"], 2)
    result["dp_over_no_dp_training"] = round(result["dp_training_s"]
                                             / result["no_dp_training_s"], 2)
    result["dp_over_no_dp_wall"] = round(result["dp_wall_s"] / result["no_dp_wall_s"], 2)
    return result


def bench_fedavg_vs_plain(config: Path, rounds: int, threads: int,
                          work: Path) -> dict[str, float]:
    torch.set_num_threads(threads)
    base = load_config(config, [f"rounds={rounds}", "algorithm=fedavg", "dp.enabled=false",
                                "backend=local", f"threads={threads}", "checkpoint_every=0",
                                f"eval_every={rounds}"])
    data = load_client_data(base, range(base.clients))  # reads the files once (cached)
    engine, plain = [], []
    for repeat in range(2):
        start = time.perf_counter()
        run_federation(dataclasses.replace(base, output_dir=str(work / f"fedavg_{repeat}")))
        engine.append(time.perf_counter() - start)
        start = time.perf_counter()
        plain_fedavg(base, data)
        plain.append(time.perf_counter() - start)
    startup = _launch([sys.executable, "-c", "import slidefed.cli, federation.loop"]).wall
    return {
        "engine_s": round(min(engine), 2),
        "plain_loop_s": round(min(plain), 2),
        "engine_over_plain": round(min(engine) / min(plain), 2),
        "process_start_s": round(startup, 2),
        "engine_over_plain_plus_start": round(min(engine) / (min(plain) + startup), 2),
    }


def import_time(repeats: int = 3) -> Timing:
    """Median wall and CPU time of a fresh process that runs ``import torch, opacus``: the
    unit of ``bench_packing``."""
    timings = [_launch([sys.executable, "-c", "import torch, opacus"]) for _ in range(repeats)]
    return Timing(statistics.median(t.wall for t in timings),
                  statistics.median(t.cpu for t in timings))


# The paper's public code scores every client on the whole test set every round.
GLOBAL_EVALUATION = ("data.test_distribution=global", "data.test_samples_per_client=10000",
                     "eval_every=1")


def bench_packing(config: Path, rounds: int, ranks: int, threads: int,
                  work: Path) -> dict[str, object]:
    """ProxyFL with DP and the global evaluation, one rank per client and packed on ``ranks``
    ranks; wall times in seconds and in units of ``import_time`` (its wall time), and the
    CPU time of all ranks in units of the import's CPU time. The machine's load average
    before and after says whether other work shared the cores."""
    clients = load_config(config).clients
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    unit = import_time()
    result: dict[str, object] = {"import_torch_opacus_s": round(unit.wall, 2),
                                 "import_torch_opacus_cpu_s": round(unit.cpu, 2),
                                 "load_average_before": os.getloadavg()[0]}
    for label, n in (("one_rank_per_client", clients), ("packed", ranks)):
        out = work / label
        timing = _launch([mpiexec, "-n", str(n), *_federate_command(
            config, out, rounds, threads, "algorithm=proxyfl", "backend=mpi",
            "dp.enabled=true", *GLOBAL_EVALUATION)])
        times = json.loads((out / run_files.SUMMARY).read_text())["time"]
        categories = {k[:-2]: v for k, v in times.items() if k != "wall_s"}
        result[label] = {
            "ranks": n, "wall_s": round(timing.wall, 2),
            "units": round(timing.wall / unit.wall, 2),
            "cpu_s": round(timing.cpu, 2), "cpu_units": round(timing.cpu / unit.cpu, 2),
            # Before the round loop's clock starts: interpreter, imports, MPI.
            "start_up_s": round(timing.wall - times["wall_s"], 2),
            # Inside it but in no category: data loading, models, files.
            "set_up_s": round(times["wall_s"] - sum(categories.values()), 2),
            **{f"{k}_s": round(v, 2) for k, v in sorted(categories.items())},
        }
    result["same_metrics"] = all(
        (work / "one_rank_per_client" / name).read_text() == (work / "packed" / name).read_text()
        for name in ("metrics.csv", "privacy.csv"))
    result["load_average_after"] = os.getloadavg()[0]
    return result




def command(args: argparse.Namespace) -> int:
    """``slidefed bench federation``: run the chosen benchmarks, print their JSON."""
    clients = load_config(args.config).clients
    ranks = args.ranks or default_ranks(clients)
    chosen = args.only or FEDERATION_BENCHMARKS
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report: dict[str, object] = {"rounds": args.rounds, "threads": args.threads}
        if "fedavg_vs_plain" in chosen:
            report["fedavg_vs_plain"] = bench_fedavg_vs_plain(args.config, args.rounds,
                                                              args.threads, work)
        if "proxyfl_mpi" in chosen:
            report["proxyfl_mpi"] = bench_proxyfl_mpi(args.config, args.rounds, clients,
                                                      args.threads, work)
        if "packing" in chosen:
            report["packing"] = bench_packing(args.config, args.rounds, ranks, args.threads,
                                              work)
    print(json.dumps(report))
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_federation_arguments(parser)
    command(parser.parse_args(argv))


if __name__ == "__main__":
    main()

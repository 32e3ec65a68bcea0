"""Time whole federation runs against their speed targets and a plain PyTorch reference.

In ProxyFL's Fashion-MNIST setting (``configs/benchmarks/fashion_mnist.yaml``: 8 clients x
1,000 images, 784-200-200-10 MLP private and proxy, batch 250, σ = 1, C = 1, p_major 0.8):

1. ``proxyfl_mpi``: ``mpiexec -n 8 slidefed federate`` for ``--rounds`` rounds, wall time
   from launch to exit (start-up included), with DP and, for the DP overhead, without.
2. ``fedavg_vs_plain``: FedAvg without DP on the local backend (``run_federation``, one
   process) against ``plain_fedavg`` — the same training written as a bare PyTorch loop over
   the same tensors — timed in the same process; and the start-up of a process that imports
   what ``slidefed federate`` imports.

Run ``python -m federation.bench_federation [--rounds 30]``; it prints one JSON object.
Both runs of a pair use the same torch thread count (``--threads``, default 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from federation import run_files
from federation.config import FederationConfig, load_config
from federation.data import load_client_data
from federation.data.image_clients import ImageClientData
from federation.loop import run_federation
from federation.models import create_model
from federation.seeds import derive_seed

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "benchmarks" / "fashion_mnist.yaml"


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


def _launch(command: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr[-2000:]}")
    return seconds


def _federate_command(config: Path, out: Path, rounds: int, threads: int,
                      *settings: str) -> list[str]:
    command = [sys.executable, "-m", "slidefed", "-q", "federate", "--config",
               str(config), "--set", f"rounds={rounds}", "--set", f"output_dir={out}",
               "--set", f"threads={threads}", "--set", "checkpoint_every=0"]
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
        result[f"{label}_wall_s"] = round(_launch(command), 2)
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
    startup = _launch([sys.executable, "-c", "import slidefed.cli, federation.loop"])
    return {
        "engine_s": round(min(engine), 2),
        "plain_loop_s": round(min(plain), 2),
        "engine_over_plain": round(min(engine) / min(plain), 2),
        "process_start_s": round(startup, 2),
        "engine_over_plain_plus_start": round(min(engine) / (min(plain) + startup), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-mpi", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report = {"rounds": args.rounds, "threads": args.threads,
                  "fedavg_vs_plain": bench_fedavg_vs_plain(args.config, args.rounds,
                                                           args.threads, work)}
        if not args.skip_mpi:
            report["proxyfl_mpi"] = bench_proxyfl_mpi(args.config, args.rounds, args.ranks,
                                                      args.threads, work)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

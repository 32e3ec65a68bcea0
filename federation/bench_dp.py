"""Time one DP-SGD training step per mechanism against the same step without DP.

The ProxyFL paper's Fashion-MNIST setting (Kalra et al., Nature Communications 2023,
arXiv 2111.11343): a client holds 1,000 28×28 images, the proxy is the 784-200-200-10 MLP,
batch 250, Adam (lr 1e-3, weight decay 1e-4), σ = 1, C = 1. Data are random tensors of that
shape (timing does not depend on pixel values). Every variant iterates its data loader,
so loading is part of the step: a shuffled loader without DP, Poisson-sampled indices with DP.

Run ``python -m federation.bench_dp``; it prints one JSON object: milliseconds per step
without DP and with each mechanism of ``federation.privacy`` (each repeat times ``--steps``
steps; median and minimum over repeats; wall-clock time, and this thread's CPU time, which
other processes' load inflates far less), their ratios to no DP, and the cost of one ε evaluation
after a 300-round run's steps with opacus' accountant and with ours — what evaluating ε
inside every step, as opposed to once per round, would add to each step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterable, Iterator

import opacus
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from federation.config import DPConfig
from federation.models import create_model
from federation.privacy import MECHANISMS, PrivateTraining, epsilon_from_history

StepFn = Callable[[], None]


def _dataset(n: int, image_size: int, in_channels: int, seed: int) -> TensorDataset:
    rng = torch.Generator().manual_seed(seed)
    images = torch.randn(n, in_channels, image_size, image_size, generator=rng)
    labels = torch.randint(0, 10, (n,), generator=rng)
    return TensorDataset(images, labels)


def _endless(batches: Iterable) -> Iterator:
    while True:
        yield from batches


def _model(args: argparse.Namespace) -> torch.nn.Module:
    return create_model(
        args.model,
        num_classes=10,
        in_channels=args.in_channels,
        image_size=args.image_size,
        seed=args.seed,
    )


def _adam(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)


def _plain_step(args: argparse.Namespace, dataset: TensorDataset, device: torch.device) -> StepFn:
    model = _model(args).to(device)
    optimizer = _adam(model)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    batches = _endless(loader)

    def step() -> None:
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def _private_step(
    args: argparse.Namespace, dataset: TensorDataset, device: torch.device, mechanism: str
) -> StepFn:
    model = _model(args).to(device)
    training = PrivateTraining(
        model,
        _adam(model),
        num_units=len(dataset),
        batch_size=args.batch_size,
        settings=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, mechanism=mechanism),
        seed=args.seed,
    )
    inputs, labels = dataset.tensors
    batches = _endless(training.batch_sampler)

    def step() -> None:
        index = torch.as_tensor(next(batches), dtype=torch.int64)
        x, y = inputs[index].to(device), labels[index].to(device)
        training.backward(F.cross_entropy(model(x), y, reduction="none"))
        training.step()

    return step


def _time_steps(step: StepFn, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(wall, CPU) milliseconds per step. With one intra-op thread and no loader workers all
    work runs on this thread, so its CPU time is far less inflated by other processes' load
    than wall time (not immune: they still share caches and memory bandwidth)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1e3 * (time.perf_counter() - wall) / steps, 1e3 * (time.thread_time() - cpu) / steps


def _summary(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "median": {name: round(value, 3) for name, value in median.items()},
        "min": {name: round(min(values), 3) for name, values in times.items()},
        "ratio_to_no_dp_median": {
            name: round(median[name] / median["no_dp"], 2) for name in times if name != "no_dp"
        },
    }


def _ms_per_call(function: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return 1e3 * (time.perf_counter() - start) / calls


def _epsilon_costs(steps_in_run: int, sample_rate: float, calls: int) -> dict[str, float]:
    """ms per ε evaluation: opacus' accountant, and ours (after its one-off cache fill)."""
    history = [(1.0, sample_rate, steps_in_run)]
    accountant = opacus.accountants.RDPAccountant()
    accountant.history = list(history)
    opacus_ms = _ms_per_call(lambda: accountant.get_epsilon(delta=1e-5), calls)
    first_ms = _ms_per_call(lambda: epsilon_from_history(history, 1e-5), 1)
    cached_ms = _ms_per_call(lambda: epsilon_from_history(history, 1e-5), 100 * calls)
    return {
        "opacus_rdp_accountant": round(opacus_ms, 3),
        "epsilon_from_history_first_call": round(first_ms, 3),
        "epsilon_from_history": round(cached_ms, 4),
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    """Measure and return the JSON-ready results."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dataset = _dataset(args.records, args.image_size, args.in_channels, args.seed)
    variants: dict[str, Callable[[], StepFn]] = {
        "no_dp": lambda: _plain_step(args, dataset, device)
    }
    for name in MECHANISMS:
        variants[name] = lambda name=name: _private_step(args, dataset, device, name)
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved, so load from other processes hits all alike
        for name, build in variants.items():
            wall_ms, cpu_ms = _time_steps(build(), args.steps, args.warmup, device)
            wall[name].append(wall_ms)
            cpu[name].append(cpu_ms)
    sample_rate = args.batch_size / args.records
    steps_in_run = args.rounds * round(1 / sample_rate)
    return {
        "setting": {
            "model": args.model,
            "input": [args.in_channels, args.image_size, args.image_size],
            "records": args.records,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "device": str(device),
            "steps_timed": args.steps,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "opacus": opacus.__version__,
        },
        "wall_ms_per_step": _summary(wall),
        "cpu_ms_per_step": _summary(cpu),
        "epsilon_ms_per_call": _epsilon_costs(steps_in_run, sample_rate, args.epsilon_calls),
        "epsilon_steps_in_history": steps_in_run,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp")
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
    print(json.dumps(run(parser.parse_args(argv)), indent=2))


if __name__ == "__main__":
    main()

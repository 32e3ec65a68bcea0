"""Time one DP-SGD training step per mechanism against the same step without DP.

The ProxyFL paper's Fashion-MNIST setting (Kalra et al., Nature Communications 2023,
arXiv 2111.11343): a client holds 1,000 28×28 images, the proxy is the 784-200-200-10 MLP,
batch 250, Adam (lr 1e-3, weight decay 1e-4), σ = 1, C = 1. Data are random tensors of that
shape (timing does not depend on pixel values). Every variant iterates its data loader,
so loading is part of the step: a shuffled loader without DP, Poisson-sampled indices with DP.

Run ``python -m benchmarks.dp``; it prints one JSON object: milliseconds per step
without DP and with each mechanism of ``federation.privacy`` (each repeat times ``--steps``
steps; median and minimum over repeats; wall-clock time, and this thread's CPU time, which
other processes' load inflates far less), their ratios to no DP, and the cost of one ε evaluation
after a 300-round run's steps with opacus' accountant and with ours — what evaluating ε
inside every step, as opposed to once per round, would add to each step.

With ``--slides S`` it times slide-level DP instead: one batch of S slides × k patches
(``--patches-per-slide``), each step on that same batch (the slide loader is not part of
the timing), without DP, with per-patch clipping (``groups=None``) for every mechanism, and
with per-slide clipping (``groups`` = each patch's slide) for every mechanism that clips
groups. The patch-classifier setting: ``python -m benchmarks.dp --slides 8
--patches-per-slide 16 --model cnn1 --in-channels 3 --image-size 64 --classes 2``.
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

from benchmarks.options import add_dp_arguments
from federation.config import DPConfig
from federation.models import create_model
from federation.privacy.accounting import epsilon_from_history
from federation.privacy.clipping import MECHANISMS
from federation.privacy.training import PrivateTraining

# a slide-level client for the per-slide case: slides held, of which a batch is the expected
# number per step (the sampling rate changes the noise, not the cost)
SLIDES_PER_CLIENT = 64

StepFn = Callable[[], None]


def _dataset(args: argparse.Namespace, n: int) -> TensorDataset:
    rng = torch.Generator().manual_seed(args.seed)
    images = torch.randn(n, args.in_channels, args.image_size, args.image_size, generator=rng)
    labels = torch.randint(0, args.classes, (n,), generator=rng)
    return TensorDataset(images, labels)


def _endless(batches: Iterable) -> Iterator:
    while True:
        yield from batches


def _model(args: argparse.Namespace) -> torch.nn.Module:
    return create_model(
        args.model,
        num_classes=args.classes,
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
        label=f"bench/{mechanism}",
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


def _time_variants(
    variants: dict[str, Callable[[], StepFn]], args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Summaries of wall and CPU ms per step of each variant, ``args.repeats`` times each."""
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved, so load from other processes hits all alike
        for name, build in variants.items():
            wall_ms, cpu_ms = _time_steps(build(), args.steps, args.warmup, device)
            wall[name].append(wall_ms)
            cpu[name].append(cpu_ms)
    return _summary(wall), _summary(cpu)


def _setting(args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    return {
        "model": args.model,
        "classes": args.classes,
        "input": [args.in_channels, args.image_size, args.image_size],
        "threads": args.threads,
        "device": str(device),
        "steps_timed": args.steps,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "opacus": opacus.__version__,
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    """Measure and return the JSON-ready results."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dataset = _dataset(args, args.records)
    variants: dict[str, Callable[[], StepFn]] = {
        "no_dp": lambda: _plain_step(args, dataset, device)
    }
    for name in MECHANISMS:
        variants[name] = lambda name=name: _private_step(args, dataset, device, name)
    wall, cpu = _time_variants(variants, args, device)
    sample_rate = args.batch_size / args.records
    steps_in_run = args.rounds * round(1 / sample_rate)
    return {
        "setting": {
            **_setting(args, device),
            "records": args.records,
            "batch_size": args.batch_size,
        },
        "wall_ms_per_step": wall,
        "cpu_ms_per_step": cpu,
        "epsilon_ms_per_call": _epsilon_costs(steps_in_run, sample_rate, args.epsilon_calls),
        "epsilon_steps_in_history": steps_in_run,
    }


def _fixed_batch_step(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> StepFn:
    model = _model(args).to(x.device)
    optimizer = _adam(model)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def _fixed_batch_private_step(
    args: argparse.Namespace,
    x: torch.Tensor,
    y: torch.Tensor,
    mechanism: str,
    groups: torch.Tensor | None,
) -> StepFn:
    """A DP step on the batch; per slide (``groups``), the client holds SLIDES_PER_CLIENT
    slides and expects ``args.slides`` per step, per patch their patches and batch rows."""
    model = _model(args).to(x.device)
    per_slide = groups is not None
    patches = args.patches_per_slide
    records = SLIDES_PER_CLIENT if per_slide else SLIDES_PER_CLIENT * patches
    training = PrivateTraining(
        model,
        _adam(model),
        num_units=records,  # sizes the sampling rate; the bench steps on one fixed batch
        batch_size=args.slides if per_slide else len(x),
        settings=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, mechanism=mechanism),
        label=f"bench/{mechanism}",
    )

    def step() -> None:
        training.backward(F.cross_entropy(model(x), y, reduction="none"), groups)
        training.step()

    return step


def run_slides(args: argparse.Namespace) -> dict[str, object]:
    """Measure slide-level DP on one batch of ``args.slides`` × ``args.patches_per_slide``
    patches and return the JSON-ready results."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x = _dataset(args, args.slides * args.patches_per_slide).tensors[0].to(device)
    groups = torch.arange(args.slides, device=device).repeat_interleave(args.patches_per_slide)
    rng = torch.Generator().manual_seed(args.seed)
    # weak labels: each patch carries its slide's label
    y = torch.randint(0, args.classes, (args.slides,), generator=rng).to(device)[groups]
    variants: dict[str, Callable[[], StepFn]] = {"no_dp": lambda: _fixed_batch_step(args, x, y)}
    for name, mechanism in MECHANISMS.items():
        variants[f"{name}_per_patch"] = lambda name=name: _fixed_batch_private_step(
            args, x, y, name, None
        )
        if mechanism.clips_groups:
            variants[f"{name}_per_slide"] = lambda name=name: _fixed_batch_private_step(
                args, x, y, name, groups
            )
    wall, cpu = _time_variants(variants, args, device)
    return {
        "setting": {
            **_setting(args, device),
            "slides": args.slides,
            "patches_per_slide": args.patches_per_slide,
            "patches": len(x),
        },
        "wall_ms_per_step": wall,
        "cpu_ms_per_step": cpu,
    }


def command(args: argparse.Namespace) -> int:
    """``slidefed bench dp``: print the timings as JSON."""
    print(json.dumps(run_slides(args) if args.slides else run(args), indent=2))
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dp_arguments(parser)
    command(parser.parse_args(argv))


if __name__ == "__main__":
    main()

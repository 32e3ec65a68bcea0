"""Time training fed from patch bags against the same patches held as tensors in memory.

The issue's requirement: the bag data set feeds training at least 0.8x as fast as in-memory
tensors. The cohort is one hospital's preprocessing output (``manifest.csv``, ``bags/``):
``--cohort DIR``, or by default a synthetic one built in a temporary directory by
``preprocessing`` (the demo cohort's slides, tiled at 1.0 µm/px into 64-px patches); a
benchmark sits above both the engine and preprocessing, so it composes them directly.

Every variant trains a fresh CNN1 (Adam, lr 1e-3) for the same steps, each step the same
``--slides-per-step`` slides with up to ``--patches-per-slide`` patches from each, drawn by
``SlideClientData.sampled`` from one seed: so batches are identical and only where the
pixels come from differs. ``bags_workers_<w>``: decoded from the bags by the engine's reader
in ``w`` DataLoader processes; ``memory``: every patch decoded once beforehand and served from
uint8 tensors by the same sampling, collation and transforms. Timing starts after
``--warmup`` steps (which include starting the workers). Each repeat runs every variant
once, interleaved, so load from other processes hits all alike; the JSON gives patches per
second of wall-clock time (median over repeats, and each repeat) and the ratio of each bag
variant to memory, and for the in-process variants the same per second of the training
thread's CPU time, which other processes' load inflates far less (loader workers' CPU time
is not the training thread's, so they have no CPU rate).

Run ``python -m benchmarks.bags``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.options import add_bags_arguments
from federation.config import SlidesConfig
from federation.data.bags import BagIndex, BagReader, index_bag
from federation.data.slides import SlideClientData, read_manifest
from federation.models import create_model


class MemoryReader(BagReader):
    """Serves patches from uint8 tensors decoded beforehand (the in-memory baseline)."""

    def __init__(self, bags: list[BagIndex]) -> None:
        super().__init__()
        reader = BagReader()
        self.patches = {bag.path: reader.read(bag.path, np.arange(bag.n_patches))
                        for bag in bags}
        reader.close()

    def read(self, path: Path, indices: np.ndarray) -> torch.Tensor:
        return self.patches[path][torch.as_tensor(np.asarray(indices, np.int64))]


def build_cohort(directory: Path, slides: int, size: int) -> Path:
    """A synthetic hospital tiled at 1.0 µm/px into 64-px patches; returns its directory."""
    from preprocessing.demo_cohort import make_demo_cohort
    from preprocessing.hospital import preprocess_hospital
    from preprocessing.options import TilingOptions

    (hospital,) = make_demo_cohort(directory / "slides", hospitals=1,
                                   slides_per_hospital=[slides], size_um=size, workers=2)
    preprocess_hospital("bench", hospital / "labels.csv", directory / "bench",
                        TilingOptions(target_mpp=1.0, patch_size=64), workers=2,
                        progress=False)
    return directory / "bench"


def _client(bags: list[BagIndex], args: argparse.Namespace, workers: int) -> SlideClientData:
    settings = SlidesConfig(target_mpp=bags[0].target_mpp, patch_size=bags[0].patch_size,
                            patches_per_slide=args.patches_per_slide, augment=args.augment,
                            workers=workers)
    return SlideClientData("bench", {"train": bags, "validation": [], "test": []}, settings)


def _steps(n_slides: int, args: argparse.Namespace) -> list[list[int]]:
    generator = torch.Generator().manual_seed(args.seed)
    k = min(args.slides_per_step, n_slides)
    return [torch.randperm(n_slides, generator=generator)[:k].tolist()
            for _ in range(args.warmup + args.steps)]


def _patches_per_second(data: SlideClientData, steps: list[list[int]],
                        args: argparse.Namespace) -> tuple[float, float]:
    """Train a fresh CNN1 on ``steps``; patches per second of wall-clock time and of this
    thread's CPU time, over all but the warm-up steps."""
    model = create_model("cnn1", num_classes=2, seed=args.seed, **data.model_options())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = data.sampled(steps, torch.Generator().manual_seed(args.seed))
    patches, wall, cpu = 0, time.perf_counter(), time.thread_time()
    for step, batch in enumerate(batches):
        if step == args.warmup:
            patches, wall, cpu = 0, time.perf_counter(), time.thread_time()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(batch.inputs), batch.labels).backward()
        optimizer.step()
        patches += len(batch.labels)
    return patches / (time.perf_counter() - wall), patches / (time.thread_time() - cpu)


def run(args: argparse.Namespace) -> dict[str, object]:
    """Measure and return the JSON-ready results."""
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        cohort = Path(args.cohort) if args.cohort else build_cohort(Path(scratch), args.slides,
                                                                    args.size)
        bags = [index_bag(path, label) for _, label, path in read_manifest(cohort)]
        steps = _steps(len(bags), args)
        variants = {f"bags_workers_{w}": _client(bags, args, w) for w in args.workers}
        memory = _client(bags, args, 0)
        memory._rows.reader = MemoryReader(bags)  # same batches, pixels from memory
        variants["memory"] = memory
        rates: dict[str, list[float]] = {name: [] for name in variants}
        cpu_rates: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, data in variants.items():
                wall, cpu = _patches_per_second(data, steps, args)
                rates[name].append(wall)
                cpu_rates[name].append(cpu)
    median = {name: statistics.median(values) for name, values in rates.items()}
    # Workers decode outside this thread, so only in-process variants have a CPU rate.
    in_process = [name for name in variants if name in ("memory", "bags_workers_0")]
    cpu_median = {name: statistics.median(cpu_rates[name]) for name in in_process}
    return {
        "setting": {
            "cohort": str(cohort) if args.cohort else f"built: {args.slides} synthetic slides "
                                                      f"of {args.size} px",
            "slides": len(bags), "patches": int(sum(b.n_patches for b in bags)),
            "patch_size": bags[0].patch_size, "target_mpp": bags[0].target_mpp,
            "model": "cnn1", "slides_per_step": args.slides_per_step,
            "patches_per_slide": args.patches_per_slide, "augment": args.augment,
            "threads": args.threads, "steps_timed": args.steps, "warmup": args.warmup,
            "repeats": args.repeats, "torch": torch.__version__,
        },
        "patches_per_s": {name: round(value, 1) for name, value in median.items()},
        "patches_per_s_each_repeat": {name: [round(v, 1) for v in values]
                                      for name, values in rates.items()},
        "ratio_to_memory": {name: round(median[name] / median["memory"], 3)
                            for name in median if name != "memory"},
        "cpu_patches_per_s": {name: round(value, 1) for name, value in cpu_median.items()},
        "cpu_ratio_to_memory": {name: round(value / cpu_median["memory"], 3)
                                for name, value in cpu_median.items() if name != "memory"},
    }



def command(args: argparse.Namespace) -> int:
    """``slidefed bench bags``: print the timings as JSON."""
    print(json.dumps(run(args), indent=2))
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bags_arguments(parser)
    command(parser.parse_args(argv))


if __name__ == "__main__":
    main()

"""``slidefed bench predict``: how fast predict scores slides, against the bare forward pass.

The slides are tiled once, at the model's settings, into temporary bags. Each repeat then
runs, interleaved so that load from other processes hits all alike:

- ``forward``: the model alone on the same patches held in memory as model input, in the
  same batches (the ceiling);
- ``read``: the bags read, decoded and normalised in one thread, without the model (what one
  reader thread delivers);
- ``streamed``: ``patch_probabilities`` on the bags, as predict and evaluate run it: the next
  batches are read and decoded by ``readers`` background threads while the model runs on
  this one; ``streamed_one_reader`` the same with one thread (when ``readers`` is more);
- ``serial``: the same reads, decodes and forward passes one after the other (what streaming
  saves);
- ``predict``: ``predict_slides`` end to end on the slide files (tiling included, no heatmap
  or GeoJSON), and ``predict_heatmap`` the same with a heatmap per slide.

The JSON gives each variant's patches per second (the best repeat, the median, and each
repeat), the ratio of its best to ``forward``'s best, the median over repeats of its ratio to
``forward`` in the same repeat and, for the predict variants, slides per minute. The best
repeat is the one other processes disturbed least, as in ``timeit``; but a burst of speed on
a shared machine can lift one repeat of every variant (``forward`` 2x its median once, the
others 1.3x), and the median of the ratios taken within each repeat is robust to it.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from federation.cores import usable_cores
from federation.data.bags import BagIndex, BagReader, index_bag
from federation.data.patches import to_model_input
from federation.evaluation.scoring import (
    SCORING_BATCH,
    model_batches,
    patch_probabilities,
    scoring_threads,
    tumour_probabilities,
)
from preprocessing.options import TilingOptions
from preprocessing.tile import tile_slide
from slidefed.predict import load_predictor, predict_slides


def bench_predict(model: str | Path, slides: Sequence[str | Path], *, device: str = "cpu",
                  batch_size: int = SCORING_BATCH, workers: int = 1,
                  readers: int | None = None, repeats: int = 5) -> dict[str, Any]:
    """Time the variants above on ``slides`` with the model file ``model``."""
    if repeats < 1:
        raise ValueError(f"bench predict: --repeats must be at least 1, got {repeats}")
    readers = readers or scoring_threads()
    predictor = load_predictor(model, device)
    module = predictor.module.eval()
    target = next(module.parameters()).device
    options = TilingOptions(target_mpp=predictor.target_mpp, patch_size=predictor.patch_size)
    with tempfile.TemporaryDirectory(prefix="slidefed-bench-predict-") as scratch:
        bags = [index_bag(tile_slide(s, Path(scratch) / f"{i}.h5", options,
                                     progress=False).bag_path, None)
                for i, s in enumerate(slides)]
        n = sum(bag.n_patches for bag in bags)
        reader = BagReader()
        inputs = [x.to(target) for bag in bags
                  for x in model_batches(reader, bag, np.arange(bag.n_patches), batch_size)]
        reader.close()

        @torch.no_grad()
        def forward() -> None:
            for x in inputs:
                module(x)

        def read() -> None:
            scorer = BagReader()
            for bag in bags:
                for _ in model_batches(scorer, bag, np.arange(bag.n_patches), batch_size):
                    pass
            scorer.close()

        def streaming(threads: int) -> Callable[[], None]:
            def streamed() -> None:
                scorer = BagReader(threads=threads)
                for bag in bags:
                    patch_probabilities(module, scorer, bag, batch_size=batch_size)
                scorer.close()
            return streamed

        def serial() -> None:
            scorer = BagReader()
            for bag in bags:
                _serial_probabilities(module, scorer, bag, batch_size)
            scorer.close()

        def predict() -> None:
            predict_slides(model, slides, Path(scratch) / "out", device=device,
                           batch_size=batch_size, workers=workers, readers=readers,
                           heatmaps=False, progress=False)

        def predict_heatmap() -> None:
            predict_slides(model, slides, Path(scratch) / "out", device=device,
                           batch_size=batch_size, workers=workers, readers=readers,
                           progress=False)

        variants: dict[str, Callable[[], None]] = {
            "forward": forward, "read": read, "streamed": streaming(readers),
            **({"streamed_one_reader": streaming(1)} if readers > 1 else {}),
            "serial": serial, "predict": predict, "predict_heatmap": predict_heatmap}
        forward()  # warm-up: first-call allocations, lazy imports
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, run in variants.items():
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
    rates = {name: [n / s for s in times] for name, times in seconds.items()}
    base = max(rates["forward"])
    cores, threads = usable_cores(), torch.get_num_threads()
    bounds = [min(1.0, cores / (threads + f / r))
              for f, r in zip(rates["forward"], rates["read"], strict=True)]
    result: dict[str, Any] = {
        "model": str(model), "architecture": type(module).__name__, "device": str(target),
        "slides": len(bags), "patches": n, "patch_size": predictor.patch_size,
        "batch_size": batch_size, "workers": workers, "readers": readers, "repeats": repeats,
        "torch_threads": threads, "cores": cores,
        "core_bound": round(statistics.median(bounds), 3) if target.type == "cpu" else None,
        "variants": {}}
    for name, per_repeat in rates.items():
        row = {"patches_per_s": round(max(per_repeat), 1),
               "median_patches_per_s": round(statistics.median(per_repeat), 1),
               "per_repeat": [round(r, 1) for r in per_repeat],
               "ratio_to_forward": round(max(per_repeat) / base, 3),
               "paired_ratio_to_forward": round(statistics.median(
                   r / f for r, f in zip(per_repeat, rates["forward"], strict=True)), 3)}
        if name.startswith("predict"):
            row["slides_per_min"] = round(60 * len(bags) / min(seconds[name]), 1)
        result["variants"][name] = row
    return result


@torch.no_grad()
def _serial_probabilities(module: torch.nn.Module, reader: BagReader, bag: BagIndex,
                          batch_size: int) -> None:
    device = next(module.parameters()).device
    for start in range(0, bag.n_patches, batch_size):
        patches = reader.read(bag.path, np.arange(start, min(start + batch_size, bag.n_patches)))
        tumour_probabilities(module(to_model_input(patches).to(device)))

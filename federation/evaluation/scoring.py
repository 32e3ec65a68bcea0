"""Patch tumour probabilities of a slide's bag, and the slide score they aggregate to.

A patch classifier's tumour probability is the softmax of its class-1 logit. A slide's
score is the mean of its ``k`` highest patch probabilities (top-k pooling, a standard
baseline of weakly supervised WSI classification, e.g. Campanella et al., "Clinical-grade
computational pathology using weakly supervised deep learning on whole slide images",
Nature Medicine 2019, which uses k = 1): a slide is as suspicious as its most suspicious
regions, and averaging a few of them damps a single noisy patch. The same functions serve
per-round validation, ``slidefed evaluate`` and prediction, so a slide gets one score
whichever path asks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from federation.cores import usable_cores
from federation.data.bags import BagIndex, BagReader
from federation.data.patches import to_model_input

SCORING_BATCH = 256


def evenly_spaced(n: int, limit: int | None) -> np.ndarray:
    """``limit`` patch indices spread over ``0..n-1`` (all of them without a limit)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def model_batches(reader: BagReader, bag: BagIndex, indices: np.ndarray,
                  batch_size: int) -> Iterator[torch.Tensor]:
    """Model input of ``bag``'s patches ``indices``, ``batch_size`` at a time, in order. The
    next ``reader.threads`` batches are read, decoded and normalised in background threads
    while the caller runs the model on this one (HDF5 reads, libjpeg-turbo, numpy's
    arithmetic and torch's kernels release the GIL; the threads add no torch intra-op
    threads, see ``to_model_input``)."""
    starts = range(0, len(indices), batch_size)

    def load(start: int) -> torch.Tensor:
        return to_model_input(reader.read(bag.path, indices[start:start + batch_size]))

    with ThreadPoolExecutor(max_workers=reader.threads,
                            thread_name_prefix="slidefed-read") as pool:
        pending = deque(pool.submit(load, start) for start in starts[:reader.threads])
        for start in starts[reader.threads:]:
            batch = pending.popleft().result()
            pending.append(pool.submit(load, start))
            yield batch
        while pending:
            yield pending.popleft().result()


def scoring_threads() -> int:
    """Reader threads for scoring by default: one per usable core, at most 4. On 2 cores, 2-3
    threads beside the model's 2 torch threads scored 1.13-1.15x faster than one (``slidefed
    bench predict``, README); each holds a batch of model input in memory."""
    return min(4, usable_cores())


def tumour_probabilities(logits: torch.Tensor) -> np.ndarray:
    """float64 tumour (class 1) probabilities of patch ``logits`` ``(n, 2)``."""
    return torch.softmax(logits.double(), dim=1)[:, 1].cpu().numpy()


@torch.no_grad()
def over_patches(module: nn.Module, apply: Callable[[torch.Tensor], np.ndarray],
                 reader: BagReader, bag: BagIndex, indices: np.ndarray | None = None, *,
                 batch_size: int = SCORING_BATCH) -> np.ndarray:
    """``apply`` to the model input of patches ``indices`` (default: all) of ``bag``, batch
    by batch on ``module``'s device with ``module`` in eval mode, the results concatenated."""
    indices = np.arange(bag.n_patches) if indices is None else np.asarray(indices)
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    outputs = [apply(batch.to(device)) for batch in model_batches(reader, bag, indices,
                                                                   batch_size)]
    module.train(was_training)
    return np.concatenate(outputs) if outputs else np.zeros(0)


def patch_probabilities(module: nn.Module, reader: BagReader, bag: BagIndex,
                        indices: np.ndarray | None = None, *,
                        batch_size: int = SCORING_BATCH) -> np.ndarray:
    """Tumour probability of patches ``indices`` (default: all) of ``bag``, float64."""
    return over_patches(module, lambda x: tumour_probabilities(module(x)), reader, bag,
                        indices, batch_size=batch_size)


def top_k_score(probabilities: np.ndarray, k: int) -> float:
    """Mean of the ``k`` highest patch probabilities (all of them if fewer)."""
    if len(probabilities) == 0:
        raise ValueError("top_k_score: a slide without patches has no score")
    k = min(k, len(probabilities))
    return float(np.sort(probabilities)[-k:].mean())

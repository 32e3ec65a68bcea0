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

import numpy as np
import torch
from torch import nn

from federation.data.bags import BagIndex, BagReader
from federation.data.patches import to_model_input

SCORING_BATCH = 256


def evenly_spaced(n: int, limit: int | None) -> np.ndarray:
    """``limit`` patch indices spread over ``0..n-1`` (all of them without a limit)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


@torch.no_grad()
def patch_probabilities(module: nn.Module, reader: BagReader, bag: BagIndex,
                        indices: np.ndarray | None = None, *,
                        batch_size: int = SCORING_BATCH) -> np.ndarray:
    """Tumour probability of patches ``indices`` (default: all) of ``bag``, float64."""
    indices = np.arange(bag.n_patches) if indices is None else np.asarray(indices)
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    probabilities = []
    for start in range(0, len(indices), batch_size):
        patches = reader.read(bag.path, indices[start:start + batch_size])
        logits = module(to_model_input(patches).to(device))
        probabilities.append(torch.softmax(logits.double(), dim=1)[:, 1].cpu().numpy())
    module.train(was_training)
    return np.concatenate(probabilities) if probabilities else np.zeros(0)


def top_k_score(probabilities: np.ndarray, k: int) -> float:
    """Mean of the ``k`` highest patch probabilities (all of them if fewer)."""
    if len(probabilities) == 0:
        raise ValueError("top_k_score: a slide without patches has no score")
    k = min(k, len(probabilities))
    return float(np.sort(probabilities)[-k:].mean())

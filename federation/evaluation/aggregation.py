"""From a patch classifier to a slide score: top-k pooling, or a gated attention-MIL head.

``slides.aggregation`` chooses how a slide's patches become one score:

- ``top_k`` (default): the mean of the ``k`` highest patch tumour probabilities
  (``federation.evaluation.scoring.top_k_score``). Nothing is fitted.
- ``attention_mil``: a gated attention-MIL head (Ilse, Tomczak & Welling, ICML 2018,
  arXiv 1802.04712, ``federation.models.mil.GatedAttentionMIL``) over the trained CNN's patch
  features (the input of its final linear layer), fitted after training with slide labels
  on the hospital's own training slides while the CNN stays frozen. The head learns which
  patches to look at instead of trusting the k most confident ones.

A fitted head is trained on a hospital's slides without DP, so it never travels: it is saved in
that hospital's private decision card beside the model file
(``federation.model_files.save_decision``), and a shared model (a proxy) scored at another
hospital gets a head fitted there, on that hospital's own training slides (``slidefed
evaluate``'s cross-site table). Every path that scores a slide — per-round validation excepted,
which uses top-k to stay cheap — goes through :func:`calibrate` / :func:`aggregator_from_card`.
A new aggregation is a ``fit_<name>`` function here and a line in ``catalog.AGGREGATIONS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from federation.catalog import AGGREGATIONS
from federation.config import SlidesConfig
from federation.data.bags import BagIndex, BagReader
from federation.evaluation.metrics import choose_threshold
from federation.evaluation.scoring import (
    SCORING_BATCH,
    evenly_spaced,
    over_patches,
    patch_probabilities,
    top_k_score,
    tumour_probabilities,
)
from federation.models.mil import GatedAttentionMIL

# The head's sizes and fit, fixed so a run needs no extra settings: small, because a hospital
# has tens to hundreds of training slides.
HEAD_EMBED_DIM = 64
HEAD_ATTENTION_DIM = 32
HEAD_EPOCHS = 200
HEAD_LR = 1e-3
HEAD_WEIGHT_DECAY = 1e-4


class SlideAggregator(Protocol):
    """Scores slides with a patch model."""

    def score(self, module: nn.Module, reader: BagReader, bag: BagIndex,
              indices: np.ndarray | None = None, *, batch_size: int = SCORING_BATCH) -> float:
        """The slide's score in [0, 1] from patches ``indices`` (default: all), read
        ``batch_size`` at a time."""

    def score_with_probabilities(self, module: nn.Module, reader: BagReader, bag: BagIndex, *,
                                 batch_size: int = SCORING_BATCH) -> tuple[float, np.ndarray]:
        """The slide's :meth:`score` (bit for bit) and every patch's tumour probability, from
        one pass of the slide's patches through ``module``."""

    def card(self) -> dict[str, Any]:
        """What a model file stores to rebuild this aggregator."""


class TopK:
    """Mean of the ``k`` highest patch tumour probabilities."""

    def __init__(self, k: int) -> None:
        self.k = k

    def score(self, module: nn.Module, reader: BagReader, bag: BagIndex,
              indices: np.ndarray | None = None, *, batch_size: int = SCORING_BATCH) -> float:
        return top_k_score(patch_probabilities(module, reader, bag, indices,
                                               batch_size=batch_size), self.k)

    def score_with_probabilities(self, module: nn.Module, reader: BagReader, bag: BagIndex, *,
                                 batch_size: int = SCORING_BATCH) -> tuple[float, np.ndarray]:
        probabilities = patch_probabilities(module, reader, bag, batch_size=batch_size)
        return top_k_score(probabilities, self.k), probabilities

    def card(self) -> dict[str, Any]:
        return {"method": "top_k", "k": self.k}


class AttentionHead:
    """A fitted gated attention-MIL head over ``module``'s patch features."""

    def __init__(self, head: GatedAttentionMIL) -> None:
        self.head = head.eval()

    def score(self, module: nn.Module, reader: BagReader, bag: BagIndex,
              indices: np.ndarray | None = None, *, batch_size: int = SCORING_BATCH) -> float:
        features = torch.from_numpy(patch_features(module, reader, bag, indices,
                                                   batch_size=batch_size))
        return self._slide_score(features)

    def score_with_probabilities(self, module: nn.Module, reader: BagReader, bag: BagIndex, *,
                                 batch_size: int = SCORING_BATCH) -> tuple[float, np.ndarray]:
        # The patch probabilities are the CNN's final layer applied to the same features.
        features = torch.from_numpy(patch_features(module, reader, bag, batch_size=batch_size))
        _, classifier = feature_layers(module)
        with torch.no_grad():
            probabilities = tumour_probabilities(classifier(features.to(
                classifier.weight.device)))
        return self._slide_score(features), probabilities

    @torch.no_grad()
    def _slide_score(self, features: torch.Tensor) -> float:
        return float(torch.softmax(self.head(features).double(), dim=0)[1])

    def card(self) -> dict[str, Any]:
        first = self.head.embed[0]
        return {"method": "attention_mil", "in_features": first.in_features,
                "embed_dim": first.out_features,
                "attention_dim": self.head.attention_score.in_features,
                "state_dict": {k: v.detach().cpu() for k, v in self.head.state_dict().items()},
                "fitted_on": "this hospital's training slides, without DP: never shared"}


def feature_layers(module: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """``module`` split into its patch-feature extractor and its final linear layer.

    Works for ``nn.Sequential`` classifiers ending in ``nn.Linear`` (``federation.models``)
    and timm models (``forward_features`` + ``forward_head(pre_logits=True)``).
    """
    if isinstance(module, nn.Sequential) and isinstance(module[-1], nn.Linear):
        return module[:-1], module[-1]
    if hasattr(module, "forward_head") and hasattr(module, "get_classifier"):
        classifier = module.get_classifier()
        if isinstance(classifier, nn.Linear):
            return _TimmFeatures(module), classifier
    raise ValueError(f"attention_mil: cannot find the patch features of a "
                     f"{type(module).__name__} (needs a final linear layer)")


class _TimmFeatures(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def patch_features(module: nn.Module, reader: BagReader, bag: BagIndex,
                   indices: np.ndarray | None = None, *,
                   batch_size: int = SCORING_BATCH) -> np.ndarray:
    """float32 ``(n, D)`` features of patches ``indices`` (default: all) of ``bag``."""
    extractor, _ = feature_layers(module)
    return over_patches(module, lambda x: extractor(x).float().cpu().numpy(), reader, bag,
                        indices, batch_size=batch_size)


def fit_attention_head(features: Sequence[np.ndarray], labels: Sequence[int], *,
                       seed: int) -> GatedAttentionMIL:
    """A head fitted on slides' patch ``features`` and slide ``labels``: full-batch Adam on
    the class-weighted cross-entropy, bags padded and masked, seeded."""
    if len(set(labels)) < 2:
        raise ValueError("attention_mil: fitting a slide head needs training slides of both "
                         "classes")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = GatedAttentionMIL(in_features=features[0].shape[1], num_classes=2,
                                 embed_dim=HEAD_EMBED_DIM, attention_dim=HEAD_ATTENTION_DIM)
    longest = max(len(f) for f in features)
    bags = torch.zeros(len(features), longest, features[0].shape[1])
    mask = torch.zeros(len(features), longest, dtype=torch.bool)
    for i, f in enumerate(features):
        bags[i, :len(f)] = torch.from_numpy(f)
        mask[i, :len(f)] = True
    y = torch.tensor(list(labels))
    weights = (len(y) / (2.0 * torch.bincount(y, minlength=2))).float()
    optimizer = torch.optim.Adam(head.parameters(), lr=HEAD_LR, weight_decay=HEAD_WEIGHT_DECAY)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    head.train()
    for _ in range(HEAD_EPOCHS):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(head(bags, mask), y).backward()
        optimizer.step()
    return head.eval()


def calibrate(settings: SlidesConfig, module: nn.Module, reader: BagReader,
              train: Sequence[BagIndex], validation: Sequence[BagIndex], *, seed: int,
              what: str) -> tuple[SlideAggregator, float]:
    """The aggregator ``settings.aggregation`` for ``module``, fitted where it needs fitting
    on the ``train`` slides (at most ``settings.eval_patches_per_slide`` evenly spaced
    patches of each; null: all), and the decision threshold on its scores of the
    ``validation`` slides (``choose_threshold``; ``what`` names them in its warnings)."""
    aggregator = AGGREGATIONS[settings.aggregation](
        module, reader, train, top_k=settings.top_k, limit=settings.eval_patches_per_slide,
        seed=seed)
    scores = [aggregator.score(module, reader, bag) for bag in validation]
    return aggregator, choose_threshold([bag.label for bag in validation], scores, what=what)


def fit_top_k(module: nn.Module, reader: BagReader, train: Sequence[BagIndex], *,
              top_k: int, limit: int | None, seed: int) -> TopK:
    """Top-k pooling: nothing to fit."""
    del module, reader, train, limit, seed
    return TopK(top_k)


def fit_attention_mil(module: nn.Module, reader: BagReader, train: Sequence[BagIndex], *,
                      top_k: int, limit: int | None, seed: int) -> AttentionHead:
    """An attention head on ``module``'s features of the ``train`` slides."""
    del top_k
    features = [patch_features(module, reader, bag, evenly_spaced(bag.n_patches, limit))
                for bag in train]
    return AttentionHead(fit_attention_head(features, [bag.label for bag in train], seed=seed))


def aggregator_from_card(card: dict[str, Any]) -> SlideAggregator:
    """The aggregator a model file's ``decision["aggregation"]`` describes."""
    if card.get("method") == "top_k":
        return TopK(int(card["k"]))
    if card.get("method") == "attention_mil":
        head = GatedAttentionMIL(in_features=int(card["in_features"]), num_classes=2,
                                 embed_dim=int(card["embed_dim"]),
                                 attention_dim=int(card["attention_dim"]))
        head.load_state_dict(card["state_dict"])
        return AttentionHead(head)
    raise ValueError(f"unknown slide aggregation {card.get('method')!r}")


def model_aggregator(document: dict[str, Any], decision: dict[str, Any] | None = None
                     ) -> SlideAggregator:
    """The aggregator of a model file's contents (``federation.model_files``) and its
    ``decision`` (``read_decision``; default the file's own, as files written before decision
    cards hold it): its ``aggregation``, or top-k with ``data["aggregation"]["k"]`` when there
    is none (a shared model without its hospital's card, files written before fitted
    aggregations)."""
    card = (document["decision"] if decision is None else decision).get("aggregation")
    if card is None:
        card = {"method": "top_k", "k": document["data"]["aggregation"]["k"]}
    return aggregator_from_card(card)

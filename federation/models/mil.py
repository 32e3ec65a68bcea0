"""Attention-based multiple-instance learning over a bag of instance embeddings.

Registered as ``attention_mil`` in ``federation.catalog``; ``federation.evaluation``'s
attention aggregator fits it as a slide head.
"""

from __future__ import annotations

import torch
from torch import nn


class GatedAttentionMIL(nn.Module):
    """Gated attention-based multiple-instance pooling and classifier.

    Ilse, Tomczak & Welling, "Attention-based deep multiple instance learning", ICML 2018,
    arXiv 1802.04712, eq. 9: for instance embeddings h_k = ReLU(W_e x_k),
    a_k = softmax_k(wᵀ(tanh(V h_k) ⊙ sigm(U h_k))), the bag embedding is z = Σ_k a_k h_k and
    the slide logits are a linear map of z.

    Input: one bag ``(N, D)`` or a padded batch of bags ``(B, N, D)`` with an optional
    boolean ``mask`` ``(B, N)`` marking real instances. ``forward`` returns logits (``(C,)``
    for one bag, ``(B, C)`` for a batch), so generic losses apply; ``attend`` returns the
    logits and the attention weights. Batching bags keeps the batch dimension first, which
    is what per-sample (per-slide) DP gradients need.
    """

    def __init__(
        self, *, in_features: int, num_classes: int, embed_dim: int, attention_dim: int
    ) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_features, embed_dim), nn.ReLU())
        self.attention_tanh = nn.Sequential(nn.Linear(embed_dim, attention_dim), nn.Tanh())
        self.attention_gate = nn.Sequential(nn.Linear(embed_dim, attention_dim), nn.Sigmoid())
        self.attention_score = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(embed_dim, num_classes)

    def attend(
        self, bags: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slide logits and attention weights (summing to 1 over each bag's instances)."""
        single = bags.dim() == 2
        if single:
            bags = bags.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
        if bags.dim() != 3:
            raise ValueError(
                f"attention_mil: expected (N, D) or (B, N, D), got {tuple(bags.shape)}"
            )
        h = self.embed(bags)
        scores = self.attention_score(self.attention_tanh(h) * self.attention_gate(h)).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attention = torch.softmax(scores, dim=1)
        logits = self.classifier(torch.einsum("bn,bnd->bd", attention, h))
        if single:
            return logits.squeeze(0), attention.squeeze(0)
        return logits, attention

    def forward(self, bags: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(bags, mask)[0]


def attention_mil(
    *, num_classes: int, in_features: int = 512, embed_dim: int = 500, attention_dim: int = 128
) -> nn.Module:
    """Gated attention-MIL head over patch feature vectors; the paper's sizes M=500, L=128."""
    return GatedAttentionMIL(
        in_features=in_features,
        num_classes=num_classes,
        embed_dim=embed_dim,
        attention_dim=attention_dim,
    )

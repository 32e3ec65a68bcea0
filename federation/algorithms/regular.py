"""Regular: every client trains on its own data alone — the baseline that federation must beat.

Kalra et al., "Decentralized federated learning through proxy model sharing", Nature
Communications 14:2899 (2023), arXiv 2111.11343, where it is the lower reference point. Two
variants: ``regular`` trains without DP (the stronger baseline, for a site that shares
nothing), ``regular_dp`` with DP-SGD, as in the paper's experiments.
"""

from __future__ import annotations

from federation.algorithms.base import Algorithm, Losses
from federation.client import ModelRole


class Regular(Algorithm):
    """Local training only: no DP, no communication.

    Update rule, per client k and batch B ⊂ D_k: θ_k ← θ_k − η ∇ (1/|B|) Σ_{(x,y)∈B} CE(f_θk(x), y)
    (with the configured optimizer, Adam by default).

    Parameters: ``optim.*`` (adam, lr 1e-3, weight_decay 1e-4, batch_size 250,
    local_epochs 1); the model is ``model.private``.
    """

    roles = {"private": ModelRole("private", leaves_client=False, common_init=False)}
    reported_model = "private"

    def run_round(self, round: int) -> Losses:
        return self.train_locally("private")


class RegularDP(Regular):
    """Regular with a released model: each client trains alone, with DP-SGD.

    The ProxyFL paper's Regular baseline (Kalra et al. 2023): its experiments train the
    baselines' models with the same DP-SGD as the shared ones (the authors' published
    experiment code gives Regular's model the proxies' DP optimizer), so a client that trains
    alone is held to the same (ε, δ) — what it takes to publish its model. The update rule is
    Regular's, with the DP-SGD step of ``federation.privacy`` in place of the plain one. Nothing
    travels. With ``dp.enabled: false`` it is ``regular``.
    """

    roles = {"private": ModelRole("private", leaves_client=False, common_init=False,
                                  released=True)}

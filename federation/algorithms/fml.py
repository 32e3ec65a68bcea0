"""FML, federated mutual learning: a private local model and a DP "meme" model averaged by FedAvg.

Shen, Wang, Zhang, Kuang, Wu, Zhang & Wu, "Federated Mutual Learning", arXiv 2006.16765
(2020). The local and meme models learn from each other by deep mutual learning (Zhang et al.,
CVPR 2018, arXiv 1706.00384); the memes are averaged as in FedAvg (McMahan et al., AISTATS
2017, arXiv 1602.05629). DP on the meme follows the comparison of Kalra et al. (Nature
Communications 2023, arXiv 2111.11343).
"""

from __future__ import annotations

from federation.algorithms.base import Algorithm, Losses
from federation.client import ModelRole


class FederatedMutualLearning(Algorithm):
    """Mutual learning of local and meme model, then a data-weighted average of the memes.

    Round t, client k, for each Poisson batch B of D_k:

        L_local = (1 − α)·CE(f_θ(x), y) + α·KL(f_m(x) ‖ f_θ(x))    θ ← θ − η ∇L_local
        L_meme  = (1 − β)·CE(f_m(x), y) + β·KL(f_θ(x) ‖ f_m(x))    m ← m − η DP(∇L_meme)

    then m ← Σ_k n_k m_k / Σ_k n_k over all clients (n_k: client k's training-set size),
    which every client adopts as its meme for the next round.

    Parameters: ``dml.alpha`` 0.5, ``dml.beta`` 0 (the paper: 0.5; β > 0 leaves the meme's ε
    the DP-SGD steps' only, as in ``ProxyFL``), ``optim.*``, ``dp.*``; the local model is
    ``model.private``, the meme ``model.proxy``. Every client takes part in every round.
    """

    roles = {
        "private": ModelRole("private", leaves_client=False, common_init=False),
        "shared": ModelRole("proxy", leaves_client=True, common_init=True),
    }
    reported_model = "private"
    dp_model_teacher = "private"

    def run_round(self, round: int) -> Losses:
        losses = self.train_mutually("private", "shared")
        weights = {
            c: float(client.data.num_units) if "shared" in losses[c] else 0.0
            for c, client in self.clients.items()
        }
        self.weighted_average("shared", weights)
        return losses

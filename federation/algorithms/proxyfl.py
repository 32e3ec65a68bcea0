"""ProxyFL: a private model that never leaves the client and a DP proxy that is shared.

Kalra, Wen, Cresswell, Volkovs & Tizhoosh, "Decentralized federated learning through proxy
model sharing", Nature Communications 14:2899 (2023), arXiv 2111.11343, Algorithm 1. The
private and proxy models learn from each other by deep mutual learning (Zhang, Xiang,
Hospedales & Lu, CVPR 2018, arXiv 1706.00384); only proxies, trained with DP-SGD, travel.
"""

from __future__ import annotations

from federation.algorithms.base import Algorithm, Losses
from federation.client import ModelRole


class ProxyFL(Algorithm):
    """Mutual learning of private and proxy, then push-averaging of the proxies.

    Round t, client k, for each Poisson batch B of D_k:

        L_θ = (1 − α)·CE(f_θ(x), y) + α·KL(f_φ(x) ‖ f_θ(x))    θ ← θ − η ∇L_θ       (no DP)
        L_φ = (1 − β)·CE(f_φ(x), y) + β·KL(f_θ(x) ‖ f_φ(x))    φ ← φ − η DP(∇L_φ)   (DP-SGD)

    with the other model's output treated as a constant; then send φ_k to the out-peer
    k + 2^(t mod ⌈log2 K⌉) of the exponential graph and set φ_k ← ½(φ_k + φ_j) for the proxy
    φ_j received.

    Parameters: ``dml.alpha`` 0.5, ``dml.beta`` 0 (the paper: 0.5), ``topology``
    (exponential), ``optim.*``, ``dp.*`` (σ 1.0, C 1.0); models ``model.private`` (own
    weights per client) and ``model.proxy`` (the same initial weights on every client).

    β = 0 is slidefed's default because it makes the proxy's ε a theorem: L_φ is then the
    proxy's own cross-entropy, and φ depends on the client's data only through DP-SGD and
    on its peers only through their DP proxies. The paper's β > 0 distils from θ, trained
    without DP on the same records, so one record changes every sampled record's term of
    L_φ and the sensitivity C that the accountant assumes no longer bounds a step; its ε is
    then reported as covering the DP-SGD steps only (``Algorithm.guarantee``).
    """

    roles = {
        "private": ModelRole("private", leaves_client=False, common_init=False),
        "proxy": ModelRole("proxy", leaves_client=True, common_init=True),
    }
    reported_model = "private"
    dp_model_teacher = "private"

    def run_round(self, round: int) -> Losses:
        losses = self.train_mutually("private", "proxy")
        self.mix_with_peers("proxy", round, self.topology())
        return losses

"""AvgPush: one DP model per client, trained locally and push-averaged with graph neighbours.

The baseline of Kalra et al., "Decentralized federated learning through proxy model sharing",
Nature Communications 14:2899 (2023), arXiv 2111.11343: ProxyFL's communication without a
private model. Its gossip is that of Stochastic Gradient Push (Assran, Loizou, Ballas &
Rabbat, ICML 2019, arXiv 1811.10792) on the time-varying directed exponential graph.
"""

from __future__ import annotations

from federation.algorithms.base import Algorithm, Losses
from federation.client import ModelRole


class AvgPush(Algorithm):
    """Local DP training, then push-averaging.

    Round t, client k: φ_k ← DP-SGD epochs of CE on D_k; send φ_k to its out-peer
    k + 2^(t mod ⌈log2 K⌉); φ_k ← ½(φ_k + φ_j) for the model φ_j received (mean over all
    received models for other topologies).

    Parameters: ``topology`` (exponential), ``optim.*``, ``dp.*`` (σ 1.0, C 1.0); the model is
    ``model.proxy``, starting from the same weights on every client.
    """

    roles = {"shared": ModelRole("proxy", leaves_client=True, common_init=True)}
    reported_model = "shared"

    def run_round(self, round: int) -> Losses:
        losses = self.train_locally("shared")
        self.mix_with_peers("shared", round, self.topology())
        return losses

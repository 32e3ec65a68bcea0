"""FedAvg: sampled clients train a common model locally and a server averages the results.

McMahan, Moore, Ramage, Hampson & Agüera y Arcas, "Communication-efficient learning of deep
networks from decentralized data", AISTATS 2017, arXiv 1602.05629 (Algorithm 1). The server is
an allreduce; local training uses DP-SGD as in the comparison of Kalra et al. (Nature
Communications 2023, arXiv 2111.11343).
"""

from __future__ import annotations

import numpy as np

from federation.algorithms.base import Algorithm, Losses
from federation.client import ModelRole
from federation.seeds import derive_seed


class FedAvg(Algorithm):
    """Client sampling, local DP training, data-weighted averaging.

    Round t: S_t = m clients drawn without replacement, m = max(1, round(C·K)); each k ∈ S_t
    sets w_k ← w and runs DP-SGD epochs on D_k; then w ← Σ_{k∈S_t} n_k w_k / Σ_{k∈S_t} n_k,
    adopted by every client.

    S_t comes from a generator seeded by (seed, t), so every process draws the same clients
    without communicating. The average is one allreduce in which clients outside S_t (or past
    their ε budget) contribute weight zero.

    Parameters: ``fedavg.client_fraction`` C (1.0), ``optim.*``, ``dp.*``; the model is
    ``model.proxy``, starting from the same weights on every client.
    """

    roles = {"shared": ModelRole("proxy", leaves_client=True, common_init=True)}
    reported_model = "shared"

    def sampled_clients(self, round: int) -> set[int]:
        """S_t: the same set on every process."""
        k = self.comm.size
        m = max(1, int(np.rint(self.config.fedavg.client_fraction * k)))
        rng = np.random.default_rng(derive_seed(self.config.seed, "fedavg", round))
        return {int(c) for c in rng.choice(k, size=min(m, k), replace=False)}

    def run_round(self, round: int) -> Losses:
        losses = self.train_locally("shared", only=self.sampled_clients(round))
        weights = {
            c: float(client.data.num_units) if c in losses else 0.0
            for c, client in self.clients.items()
        }
        self.weighted_average("shared", weights)
        return losses


"""Cyclic weight transfer: one model visits the clients in turn around a ring.

Chang, Balachandar, Lam, Yi, Brown, Beers, Rosen, Rubin & Kalpathy-Cramer, "Distributed deep
learning networks among institutions for medical imaging", JAMIA 25(8):945-954 (2018). Every
client trains at once here, so K models travel the ring, each one step per round, as in the
comparison of Kalra et al. (Nature Communications 2023, arXiv 2111.11343).
"""

from __future__ import annotations

from federation.algorithms.base import Algorithm, Losses
from federation.client import ModelRole
from federation.transport.topology import make_topology


class CyclicWeightTransfer(Algorithm):
    """Train, then hand the model on to the next client.

    Round t, client k: φ_k ← DP-SGD epochs of CE on D_k; send φ_k to client k+1 (mod K);
    φ_k ← φ_{k−1}, the model received, which client k trains next round.

    Parameters: ``optim.*``, ``dp.*``; the model is ``model.proxy``, starting from the same
    weights on every client. The ring is part of the method, so ``topology`` is not used.
    """

    roles = {"shared": ModelRole("proxy", leaves_client=True, common_init=True)}
    reported_model = "shared"

    def run_round(self, round: int) -> Losses:
        losses = self.train_locally("shared")
        self.mix_with_peers("shared", round, make_topology("ring", self.comm.size),
                            keep_own=False)
        return losses

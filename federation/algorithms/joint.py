"""Joint: training on the pooled data of all clients — the upper bound, with no privacy.

Kalra et al., "Decentralized federated learning through proxy model sharing", Nature
Communications 14:2899 (2023), arXiv 2111.11343, use it as the reference that no private
method should reach. No data move here: pooled training is carried out as synchronous
data-parallel SGD, whose summed gradients equal those of a batch drawn from the pooled data.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from federation.algorithms.base import Algorithm, Losses
from federation.client import ModelRole
from federation.config import FederationConfig
from federation.data import Batch, ClientData
from federation.transport.comm import Communicator


class Joint(Algorithm):
    """One model, identical on every client, trained by synchronous data-parallel SGD.

    Each local epoch every client takes a shuffled pass over its data in batches of B; step s
    combines the s-th batch B_k,s of every client:

        g_s = Σ_k Σ_{(x,y)∈B_k,s} ∇CE(f_w(x), y) / Σ_k |B_k,s|,    w ← w − η·g_s (optimizer)

    i.e. the mean gradient over the union of the batches, the gradient of a pooled batch of
    up to K·B records. Gradient sums and batch sizes travel in one allreduce per step; every
    client applies the same update to the same weights, so the models stay identical. A
    client whose pass is shorter than the longest contributes empty batches.

    Parameters: ``optim.*``; the model is ``model.private``; no DP (a configuration with
    ``dp.enabled`` is refused: ``federation.catalog.WITHOUT_DP``).
    """

    roles = {"shared": ModelRole("private", leaves_client=False, common_init=True)}
    reported_model = "shared"

    def __init__(
        self,
        config: FederationConfig,
        comm: Communicator,
        data: dict[int, ClientData],
    ) -> None:
        super().__init__(config, comm, data)
        # Every process must take the same number of steps: learn the longest pass.
        passes = {}
        for c, client in self.clients.items():
            steps = torch.zeros(comm.size, dtype=torch.float64)
            steps[c] = math.ceil(client.data.num_units / client.models["shared"].batch_size)
            passes[c] = steps
        self.steps_per_epoch = int(comm.allreduce_sum(passes).max())

    def run_round(self, round: int) -> Losses:
        totals = {c: [0.0, 0] for c in self.clients}
        for _ in range(self.config.optim.local_epochs):
            batches = {c: client.models["shared"].batches() for c, client in self.clients.items()}
            for _ in range(self.steps_per_epoch):
                local = {}
                with self.stopwatch("training"):
                    for c, client in self.clients.items():
                        local[c] = self._gradient_sum(client.models["shared"].module,
                                                      next(batches[c], None), totals[c])
                with self.stopwatch("communication"):
                    total = self.comm.allreduce_sum(local)
                with self.stopwatch("training"):
                    gradient = (total[:-1] / total[-1]).to(torch.float32)
                    for client in self.clients.values():
                        model = client.models["shared"]
                        _set_gradient(model.module, gradient.to(model.device, copy=True))
                        model.optimizer.step()
        return {c: {"shared": loss / count} for c, (loss, count) in totals.items() if count}

    @staticmethod
    def _gradient_sum(
        module: nn.Module, batch: Batch | None, total: list
    ) -> torch.Tensor:
        """[Σ_batch ∇CE, |batch|] as one flat float64 buffer (zeros for a missing batch);
        float64 as in ``base._with_count``."""
        module.train()
        module.zero_grad(set_to_none=True)
        parameters = list(module.parameters())
        if batch is None:
            return torch.zeros(sum(p.numel() for p in parameters) + 1, dtype=torch.float64)
        device = next(module.parameters()).device
        x, y = batch.inputs.to(device), batch.labels.to(device)
        loss = F.cross_entropy(module(x), y, reduction="sum")
        loss.backward()
        total[0] += float(loss.detach())
        total[1] += len(y)
        grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                 for p in parameters]
        return torch.cat([*(g.cpu() for g in grads), torch.tensor([float(len(y))])]).to(
            torch.float64)


def _set_gradient(module: nn.Module, flat: torch.Tensor) -> None:
    """Point each parameter's ``.grad`` at its slice of ``flat``."""
    offset = 0
    for p in module.parameters():
        p.grad = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()

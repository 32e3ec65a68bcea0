"""A DP estimate of the centre that fixed-feature models subtract from their features.

A ``scattering_linear`` model (``federation.scattering``) learns well only on centred
features, and the centre is a statistic of the data: set from the data without noise, it
would leak through every model that leaves a hospital, outside what DP-SGD accounts for.
So it is released like everything else that leaves: with the Gaussian mechanism (Dwork &
Roth, "The algorithmic foundations of differential privacy", 2014, §3.5), the data
normalisation Tramèr & Boneh (ICLR 2021, arXiv 2011.11660) pay for from the privacy budget.

Once, before the first round, each hospital sums over its training units (slides) the mean
feature vector of the unit's patches, each clipped to L2 norm ``CLIP`` around the fixed
``PRIOR``, adds Gaussian noise of std σ·``CLIP`` (σ = ``dp.noise_multiplier``) and
contributes [noisy sum, unit count] to one sum over all hospitals; every hospital's model
is then centred at PRIOR + Σ sums / Σ counts. Proxies are averaged, so all of them must use
the same centre; pooling also divides the noise by the cohort's slides rather than one
hospital's. Each hospital's accountant counts its release as one step at q = 1, so the ε
it reports includes it. The count is not noised: it is public already, as n in DP-SGD's
q = B / n and in FedAvg's weights (README, "What crosses a rank"). Without DP the sums are
exact. A model that never travels (private, or only released) is centred on its own sums,
without communication. There is no scale: Adam rescales each coordinate; centring is what
the conditioning needs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from federation.client import LocalModel
from federation.comm import Communicator
from federation.scattering import ScatteringLinear

log = logging.getLogger(__name__)

# Public constants, as DP-SGD's clipping norm is: the prior sits inside the range of the
# 42 log features (each in [log 1e-3, log log 255] = [-6.9, 1.7]); the per-slide means of the
# demo cohort's training slides lie 5.9-13.1 from it, so CLIP = 13 clips almost none.
PRIOR = -3.0
CLIP = 13.0


def needs_centre(model: LocalModel) -> bool:
    """True for a model whose features must be centred before it trains."""
    return isinstance(model.module, ScatteringLinear)


def _unit_means(model: LocalModel) -> torch.Tensor:
    """(units, features) float64: each training unit's mean feature vector minus PRIOR,
    clipped to norm CLIP."""
    features = model.module.features
    with torch.no_grad():
        means = torch.stack([features(x.to(model.device)).mean(dim=0).double().cpu()
                             for x in model.data.unit_inputs()]) - PRIOR
    norms = means.norm(dim=1, keepdim=True)
    return means * torch.clamp(CLIP / norms.clamp(min=1e-12), max=1.0)


def release_centre(models: Mapping[int, LocalModel], comm: Communicator | None,
                   generators: Mapping[int, torch.Generator]) -> None:
    """Centre every model of ``models`` (client -> model, this process's clients).

    With ``comm`` the centre is pooled over all clients (a model that travels), and the call
    is collective: every process makes it once, in the same order; without, each client's
    model is centred at its own estimate (a model that never leaves, or is only released).
    A DP model's sums are noised and its accountant charged; other models' are exact.
    """
    local = {}
    for c, model in models.items():
        clipped = _unit_means(model)
        total = clipped.sum(dim=0)
        if model.privacy is not None:
            sigma = model.privacy.settings.noise_multiplier
            total += sigma * CLIP * torch.randn(total.shape, dtype=torch.float64,
                                                generator=generators[c])
            model.privacy.record_release(sigma)
        local[c] = torch.cat([total, torch.tensor([len(clipped)], dtype=torch.float64)])
    pooled = comm.allreduce_sum(local) if comm is not None else None
    for c, model in models.items():
        sums = local[c] if pooled is None else pooled
        centre = (sums[:-1] / sums[-1] + PRIOR).float().to(model.device)
        model.module.set_centre(centre)
        log.info("client %d: %s centred on %d units%s%s", c, model.name, int(sums[-1]),
                 " of all clients" if pooled is not None else "",
                 " (Gaussian mechanism)" if model.privacy is not None else "")

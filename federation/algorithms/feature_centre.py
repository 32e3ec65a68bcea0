"""A DP estimate of the centre that fixed-feature models subtract from their features.

A ``scattering_linear`` model (``federation.models.scattering``) learns well only on centred
features, and the centre is a statistic of the data: set from the data without noise, it
would leak through every model that leaves a hospital, outside what DP-SGD accounts for.
So it is released like everything else that leaves: with the Gaussian mechanism (Dwork &
Roth, "The algorithmic foundations of differential privacy", 2014, §3.5), the data
normalisation Tramèr & Boneh (ICLR 2021, arXiv 2011.11660) pay for from the privacy budget.

Once, before the first round, each hospital sums over its training units (slides) the mean
feature vector of the unit's patches, each clipped to L2 norm ``CLIP`` around the fixed
``PRIOR`` (both public: from the features' range alone, ``scattering.feature_bounds``),
adds Gaussian noise of std σ·``CLIP`` (σ = ``dp.noise_multiplier``) and
contributes [noisy sum, unit count] to one sum over all hospitals; every hospital's model
is then centred at PRIOR + Σ sums / Σ counts. Proxies are averaged, so all of them must use
the same centre; pooling also divides the noise by the cohort's slides rather than one
hospital's. Each hospital's accountant counts its release as one step at q = 1, so the ε
it reports includes it. The count is not noised: under the replace-one relation every ε is
stated for (``federation.privacy.statement``) unit counts are public. Without DP the sums are
exact. A model that never travels (private, or only released) is centred on its own sums,
without communication. There is no scale: Adam rescales each coordinate; centring is what
the conditioning needs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from federation.client import LocalModel
from federation.models.scattering import ScatteringLinear, feature_bounds
from federation.transport.comm import Communicator

log = logging.getLogger(__name__)

# Public constants, derived from the feature definition alone (``feature_bounds``), never
# from anyone's data: the prior is the middle of every feature's range and CLIP the norm of
# the half-ranges (25.5), so no slide's mean is ever clipped and the sensitivity is CLIP.
_LOWER, _UPPER = feature_bounds()
PRIOR = (_LOWER + _UPPER) / 2
CLIP = float(((_UPPER - _LOWER) / 2).norm())


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


def release_centre(models: Mapping[int, LocalModel], comm: Communicator | None) -> None:
    """Centre every model of ``models`` (client -> model, this process's clients).

    With ``comm`` the centre is pooled over all clients (a model that travels), and the call
    is collective: every process makes it once, in the same order; without, each client's
    model is centred at its own estimate (a model that never leaves, or is only released).
    A DP model's sums are noised from its secret stream and its accountant charged
    (``PrivateTraining.release_sum``); other models' are exact.
    """
    local = {}
    for c, model in models.items():
        clipped = _unit_means(model)
        total = clipped.sum(dim=0)
        if model.privacy is not None:
            total = model.privacy.release_sum(total, CLIP)
        local[c] = torch.cat([total, torch.tensor([len(clipped)], dtype=torch.float64)])
    pooled = comm.allreduce_sum(local) if comm is not None else None
    for c, model in models.items():
        sums = local[c] if pooled is None else pooled
        centre = (sums[:-1] / sums[-1] + PRIOR).float().to(model.device)
        model.module.set_centre(centre)
        log.info("client %d: %s centred on %d units%s%s", c, model.name, int(sums[-1]),
                 " of all clients" if pooled is not None else "",
                 " (Gaussian mechanism)" if model.privacy is not None else "")

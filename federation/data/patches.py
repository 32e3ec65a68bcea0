"""Patches as the model sees them: scaling, normalisation, and HED stain augmentation.

Bags store RGB uint8; a model gets float ``(k, 3, P, P)`` with each channel mapped from
[0, 1] to [-1, 1] (``PATCH_MEAN``/``PATCH_STD``: fixed constants, not statistics of a
hospital's data, so nothing about the data is baked into a model that travels, and every
hospital prepares inputs identically). Saved models record these constants.

HED stain augmentation (training only) jitters each patch's haematoxylin, eosin and DAB
concentrations, after Tellez et al., "Whole-slide mitosis detection in H&E breast histology
using PHH3 as a reference to train distilled stain-invariant convolutional networks", IEEE
TMI 37(9), 2018 (arXiv 1808.05896): RGB is unmixed into stain concentrations by colour
deconvolution (Ruifrok & Johnston 2001, the matrices of ``skimage.color``), each
concentration is scaled by
α ~ U(1 − σ, 1 + σ) and shifted by β ~ U(−σ, σ), and the result is mixed back. Hospitals
stain differently; training on jittered stains makes a model rely less on its own
hospital's colours. Concentrations are not clipped at zero, so σ = 0 returns the input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from skimage.color import hed_from_rgb, rgb_from_hed

_HED_FROM_RGB = torch.tensor(hed_from_rgb, dtype=torch.float32)
_RGB_FROM_HED = torch.tensor(rgb_from_hed, dtype=torch.float32)

PATCH_MEAN: Sequence[float] = (0.5, 0.5, 0.5)
PATCH_STD: Sequence[float] = (0.5, 0.5, 0.5)
_MEAN = np.asarray(PATCH_MEAN, np.float32).reshape(1, 3, 1, 1)
_STD = np.asarray(PATCH_STD, np.float32).reshape(1, 3, 1, 1)


def to_model_input(patches: torch.Tensor, *, hed_sigma: float = 0.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 ``(k, 3, P, P)`` patches (CPU) as normalised float32 model input, stain-jittered
    with ``hed_sigma`` (training) or not (``0``, inference).

    Bags decode to channels-last strides; the input is made contiguous here, because the
    CPU convolutions of the patch CNNs ran 1.25-2.25x slower on channels-last input
    (``slidefed bench predict``, README). The arithmetic runs in numpy, one thread without
    the GIL, so that a reader thread preparing the next batch does not start a second team
    of torch's intra-op threads beside the model's; the float32 operations are torch's, so
    the values are bit for bit the same."""
    x = np.empty(tuple(patches.shape), np.float32)
    np.copyto(x, patches.numpy(), casting="unsafe")
    np.divide(x, np.float32(255.0), out=x)
    if hed_sigma:
        if generator is None:
            raise ValueError("to_model_input: stain augmentation needs a generator")
        x = hed_jitter(torch.from_numpy(x), hed_sigma, generator).numpy()
    np.subtract(x, _MEAN, out=x)
    np.divide(x, _STD, out=x)
    return torch.from_numpy(x)


def hed_jitter(patches: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Stain-jittered copies of float RGB patches ``(k, 3, H, W)`` in [0, 1]."""
    if sigma == 0 or len(patches) == 0:
        return patches
    k = len(patches)
    rgb = patches.clamp(min=1e-6).permute(0, 2, 3, 1)  # (k, H, W, 3)
    # Concentrations in optical-density units, OD = −ln(rgb), as in the skimage version
    # Tellez et al. used (newer skimage rescales OD by 1/ln(1e-6), which would make σ ~14x
    # stronger).
    stains = -torch.log(rgb) @ _HED_FROM_RGB
    alpha = 1.0 + (torch.rand(k, 1, 1, 3, generator=generator) * 2 - 1) * sigma
    beta = (torch.rand(k, 1, 1, 3, generator=generator) * 2 - 1) * sigma
    mixed = torch.exp(-((stains * alpha + beta) @ _RGB_FROM_HED))
    return mixed.clamp(0.0, 1.0).permute(0, 3, 1, 2).contiguous()

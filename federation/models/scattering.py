"""A proxy that DP-SGD can train on few records: fixed wavelet features and a linear head.

DP-SGD adds noise of norm σ·C·√d / B to every step of a model with d parameters, so on a
hospital's few dozen slides a CNN of thousands of parameters learns nothing that survives
the noise (a 6,210-parameter CNN stays at chance on the demo, at any learning rate). Tramèr
& Boneh, "Differentially private learning needs better features (or much more data)", ICLR
2021 (arXiv 2011.11660), train only a linear model on fixed ScatterNet features instead;
``scattering_linear`` does that for H&E patches:

- **Features** (nothing learnt): optical density per RGB channel (Beer–Lambert, as in colour
  deconvolution, Ruifrok & Johnston 2001), halved in resolution; its mean and spread; and the
  mean modulus of its response to Morlet wavelets at 3 dyadic scales × 4 orientations — the
  first-order coefficients of a scattering transform (Mallat, "Group invariant scattering",
  CPAM 2012; Bruna & Mallat, IEEE TPAMI 2013), averaged over the patch. 3 × (2 + 12) = 42
  numbers, on a log scale.
- **Centring**: the features are shifted by a centre held as a buffer. Left at zero the head
  would learn slowly (the log features sit far from zero with a small spread, an
  ill-conditioned problem for any optimizer); the federation sets it once, from a DP estimate
  pooled over the hospitals (``federation.algorithms.feature_centre``). They are not rescaled: Adam
  rescales each coordinate itself.
- **Head**: one linear layer, zero-initialised: 86 parameters for 2 classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from federation.data.patches import PATCH_MEAN, PATCH_STD

SCALES = 3
ORIENTATIONS = 4
KERNEL = 5
NUM_FEATURES = 3 * (2 + SCALES * ORIENTATIONS)  # per channel: mean, spread, the wavelets
# Morlet wavelets of the finest scale, as in kymatio's 2-d scattering: centre frequency 3π/4,
# Gaussian envelope of σ 0.8 px; coarser scales reuse them on a halved picture.
_XI, _SIGMA = 3 * math.pi / 4, 0.8
_EPS = 1e-3  # floor inside the log: a flat, glassy patch has moduli near zero
_MIN_TRANSMISSION = 1 / 255  # optical density is finite at a black pixel


def morlet_filters(size: int = KERNEL, orientations: int = ORIENTATIONS
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts ``(orientations, 1, size, size)`` of zero-mean Morlet wavelets
    at angles kπ/orientations, each of unit L1 norm."""
    r = torch.arange(size, dtype=torch.float64) - size // 2
    v, u = torch.meshgrid(r, r, indexing="ij")
    envelope = torch.exp(-(u**2 + v**2) / (2 * _SIGMA**2))
    real, imag = [], []
    for k in range(orientations):
        theta = math.pi * k / orientations
        phase = _XI * (u * math.cos(theta) + v * math.sin(theta))
        wave = envelope * torch.complex(torch.cos(phase), torch.sin(phase))
        wave = wave - envelope * (wave.sum() / envelope.sum())  # Morlet: no response to a constant
        wave = wave / wave.abs().sum()
        real.append(wave.real)
        imag.append(wave.imag)
    shape = (orientations, 1, size, size)
    return (torch.stack(real).reshape(shape).float(), torch.stack(imag).reshape(shape).float())


def feature_bounds() -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper), each ``(NUM_FEATURES,)`` float64: the range every feature of
    ``ScatteringFeatures`` lies in for any input, derived from the code, not from data.

    Optical density lies in [0, D], D = log 255 (transmission is clamped to [1/255, 1]);
    its mean in [0, D], its spread in [0, D/2]; a wavelet's response to values in [0, D]
    is at most D times the larger of the sums of its positive and negative taps, per part,
    and the modulus at most the hypotenuse of the two. The log's floor ``_EPS`` is the
    lower end of every feature."""
    density = -math.log(_MIN_TRANSMISSION)
    real, imag = morlet_filters()

    def reach(taps: torch.Tensor) -> torch.Tensor:  # (orientations,) largest |Σ k·x|
        flat = taps.double().flatten(1)
        return density * torch.maximum(flat.clamp(min=0).sum(1), (-flat).clamp(min=0).sum(1))

    wavelet = torch.hypot(reach(real), reach(imag))
    # in forward's order: means (3 channels), spreads (3), then per scale 3 channels x 4
    upper = torch.cat([torch.full((3,), density, dtype=torch.float64),
                       torch.full((3,), density / 2, dtype=torch.float64),
                       *(wavelet.repeat(3) for _ in range(SCALES))])
    upper = torch.log(upper + _EPS)
    return torch.full_like(upper, math.log(_EPS)), upper


class ScatteringFeatures(nn.Module):
    """The ``NUM_FEATURES`` (42) fixed features of a batch of model inputs ``(B, 3, P, P)``."""

    def __init__(self, mean: Sequence[float] = PATCH_MEAN,
                 std: Sequence[float] = PATCH_STD) -> None:
        super().__init__()
        real, imag = morlet_filters()
        # Constants of the code, not state: rebuilt with the module, never saved or exchanged.
        self.register_buffer("real", real, persistent=False)
        self.register_buffer("imag", imag, persistent=False)
        self.register_buffer("mean", torch.tensor(mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = (x * self.std + self.mean).clamp(_MIN_TRANSMISSION, 1.0)
        density = F.avg_pool2d(-torch.log(rgb), 2)
        features = [density.mean(dim=(2, 3)), density.std(dim=(2, 3))]
        level = density
        for _ in range(SCALES):
            b, c, h, w = level.shape
            # Edges replicated, not zero-padded: a flat patch has no texture at its border.
            flat = F.pad(level.reshape(b * c, 1, h, w), (KERNEL // 2,) * 4, mode="replicate")
            # Real and imaginary parts apart, then hypot: a complex or grouped convolution
            # costs about 10x more on the CPU for these 5x5 kernels.
            modulus = torch.hypot(F.conv2d(flat, self.real), F.conv2d(flat, self.imag))
            features.append(modulus.mean(dim=(2, 3)).reshape(b, c * ORIENTATIONS))
            level = F.avg_pool2d(level, 2)
        return torch.log(torch.cat(features, dim=1) + _EPS)


class ScatteringLinear(nn.Module):
    """``ScatteringFeatures`` → minus the buffer ``centre`` → linear."""

    # Set once, alike on every client that shares the model (federation.algorithms.feature_centre),
    # and saved with it; never exchanged.
    buffers_set_alike = ("centre",)

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = ScatteringFeatures()
        self.register_buffer("centre", torch.zeros(NUM_FEATURES))
        self.head = nn.Linear(NUM_FEATURES, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def set_centre(self, centre: torch.Tensor) -> None:
        """Use ``f − centre`` of the features from now on."""
        self.centre.copy_(centre)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x) - self.centre)


def scattering_linear(*, num_classes: int, in_channels: int = 3,
                      image_size: int | None = None) -> nn.Module:
    """``ScatteringLinear`` for RGB patches of any size (86 parameters for 2 classes)."""
    if in_channels != 3:
        raise ValueError(f"scattering_linear reads RGB patches, not {in_channels} channels")
    del image_size  # features are averaged over the patch
    return ScatteringLinear(num_classes)

"""Model input (``federation.data.patches.to_model_input``) against torch's float32 arithmetic."""

from __future__ import annotations

import numpy as np
import torch

from federation.data.patches import PATCH_MEAN, PATCH_STD, hed_jitter, to_model_input

MEAN = torch.tensor(PATCH_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(PATCH_STD).view(1, 3, 1, 1)


def every_value_channels_last() -> torch.Tensor:
    """All 256 uint8 values in each channel, as bags decode them: (1, 3, 16, 16), NHWC strides."""
    pixels = np.stack([np.arange(256, dtype=np.uint8).reshape(16, 16),
                       np.arange(255, -1, -1, dtype=np.uint8).reshape(16, 16),
                       np.roll(np.arange(256, dtype=np.uint8), 7).reshape(16, 16)], axis=-1)
    return torch.from_numpy(pixels[None]).permute(0, 3, 1, 2)


def test_inference_input_is_torchs_float32_normalisation_bit_for_bit_and_contiguous() -> None:
    patches = every_value_channels_last()
    x = to_model_input(patches)
    assert x.dtype == torch.float32 and x.is_contiguous()
    assert torch.equal(x, (patches.float() / 255.0 - MEAN) / STD)
    assert x.min() == -1 and x.max() == 1


def test_stain_jittered_input_is_the_jitter_of_the_scaled_patches_normalised() -> None:
    patches = every_value_channels_last().repeat(4, 1, 1, 1)
    x = to_model_input(patches, hed_sigma=0.05, generator=torch.Generator().manual_seed(1))
    jittered = hed_jitter(patches.float() / 255.0, 0.05, torch.Generator().manual_seed(1))
    assert torch.equal(x, (jittered - MEAN) / STD)

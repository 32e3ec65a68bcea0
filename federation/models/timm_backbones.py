"""timm backbones made trainable under DP: random init (nothing downloads), every BatchNorm
replaced by GroupNorm and in-place operations made safe for opacus' hooks
(``federation.models.group_norm``). ``timm:<name>`` in a configuration builds one.
"""

from __future__ import annotations

import logging

from torch import nn

from federation.models.group_norm import make_inplace_safe, replace_batchnorm_with_groupnorm
from federation.models.registry import UnknownModelError

log = logging.getLogger(__name__)


def timm_backbone(
    *, num_classes: int, timm_name: str, in_channels: int = 3, image_size: int | None = None
) -> nn.Module:
    """A timm model from random init (never downloads weights), BatchNorm → GroupNorm,
    made safe for opacus' hooks (``make_inplace_safe``)."""
    import timm

    if not timm.is_model(timm_name):
        raise UnknownModelError(f"timm has no model {timm_name!r}")
    del image_size  # global pooling makes timm's convolutional models size-agnostic
    model = timm.create_model(
        timm_name, pretrained=False, num_classes=num_classes, in_chans=in_channels
    )
    return make_inplace_safe(replace_batchnorm_with_groupnorm(model))

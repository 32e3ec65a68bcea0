"""Models that DP-SGD can train: GroupNorm in place of BatchNorm (a sample's output must not
depend on the other samples of its batch), and outputs opacus' hooks may see modified in
place. Used by the patch CNNs (``images``) and the timm backbones (``timm_backbones``).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

log = logging.getLogger(__name__)


def group_norm_groups(channels: int, max_groups: int = 32) -> int:
    """Group count for GroupNorm replacing BatchNorm: gcd(32, C), as opacus' fixer does.

    32 groups is the default of Wu & He, "Group normalization", ECCV 2018, arXiv 1803.08494;
    the gcd keeps the count a divisor of the channel count.
    """
    return math.gcd(max_groups, channels)


def replace_batchnorm_with_groupnorm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm in ``model`` (in place) by a GroupNorm with the same channels.

    timm's fused ``BatchNormAct2d`` becomes ``GroupNormAct`` keeping its activation and drop
    layers (opacus' own fixer matches exact types and would miss it). Any other BatchNorm
    subclass is an error rather than a silent privacy leak.
    """
    from timm.layers import BatchNormAct2d, GroupNormAct

    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.modules.batchnorm._BatchNorm):
                continue
            replaced += 1
            groups = group_norm_groups(child.num_features)
            if type(child) is BatchNormAct2d:
                replacement: nn.Module = GroupNormAct(
                    child.num_features, num_groups=groups, eps=child.eps, affine=child.affine
                )
                replacement.act = child.act
                replacement.drop = child.drop
            elif type(child) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
                replacement = nn.GroupNorm(
                    groups, child.num_features, eps=child.eps, affine=child.affine
                )
            else:
                where = f"{parent_name}.{child_name}".lstrip(".")
                raise TypeError(
                    f"models.py: no GroupNorm replacement for {type(child).__name__} at {where}"
                )
            setattr(parent, child_name, replacement)
    log.debug("replaced %d BatchNorm layers of %s by GroupNorm", replaced, type(model).__name__)
    return model


class FreshOutput(nn.Module):
    """Runs ``layer`` and returns a copy of its output, which the caller may modify in place.

    opacus' per-sample-gradient hooks hand a layer's output on as a view made by a custom
    autograd function, and autograd forbids modifying such a view in place — yet timm's
    residual blocks do exactly that to their last normalisation layer (``x += shortcut``).
    This module has no parameters of its own, so opacus hooks ``layer`` and not it.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).clone()


def make_inplace_safe(model: nn.Module) -> nn.Module:
    """Prepare ``model`` (in place) for opacus' hooks: no in-place activations, and every
    GroupNorm wrapped in ``FreshOutput`` so residual additions can stay in place."""
    for module in model.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm) and not isinstance(parent, FreshOutput):
                setattr(parent, child_name, FreshOutput(child))
    return model

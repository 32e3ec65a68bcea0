"""The model zoo, one family per module, every model looked up by name (timm style):

- ``registry``: ``create_model(name, num_classes=..., ...)`` from ``federation.catalog.MODELS``,
  ``check_timm_names``, ``load_pretrained``;
- ``images``: the ProxyFL paper's MLP, LeNet-5, CNN1, CNN2, and the patch CNNs;
- ``mil``: gated attention-MIL (Ilse et al., ICML 2018);
- ``scattering``: fixed wavelet features and a linear head, the DP proxy for small cohorts;
- ``group_norm``: what makes a model trainable by DP-SGD (GroupNorm, no in-place outputs);
- ``timm_backbones``: timm models with GroupNorm for DP.

Every model here trains under opacus' per-sample-gradient machinery: no BatchNorm, no buffers
updated in training. ``create_model``, ``check_timm_names`` and ``load_pretrained`` are
re-exported here, as the one entry point the rest of the engine uses.
"""

from federation.models.registry import (
    ModelOptionsError,
    UnknownModelError,
    check_timm_names,
    create_model,
    load_pretrained,
)

__all__ = ["ModelOptionsError", "UnknownModelError", "check_timm_names", "create_model",
           "load_pretrained"]

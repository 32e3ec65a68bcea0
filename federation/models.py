"""Model zoo of the federation engine, looked up by name (timm style).

``create_model("mlp", num_classes=10, in_channels=1, image_size=28)`` builds a model from
the registry, ``federation.catalog.MODELS``; options are keyword arguments of the model's
factory. Adding a model means writing one factory function here and adding its line to the
catalog. Names of the form ``timm:<name>`` build a timm backbone with every BatchNorm
replaced by GroupNorm.

Every model here trains under opacus' per-sample-gradient machinery: no BatchNorm (a sample's
output must not depend on the other samples in its batch), no buffers updated in training.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from federation.catalog import MODELS, TIMM_PREFIX, available_models
from federation.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

ModelFactory = Callable[..., nn.Module]



class UnknownModelError(ValueError):
    """Raised for a model name that is not in the registry. A ``ValueError``, so that the CLI
    reports it in one line, as it does every other bad input."""


def create_model(
    name: str, *, num_classes: int, seed: int | None = None, **options: Any
) -> nn.Module:
    """Build the model ``name`` (a key of ``federation.catalog.MODELS``, or ``timm:<name>``).

    ``options`` are passed to the model's factory (image models take ``in_channels`` and
    ``image_size``; ``attention_mil`` takes ``in_features``). With ``seed`` the weights are
    drawn from that seed without touching the global torch RNG; without it they come from the
    global RNG (so ``torch.manual_seed`` makes them reproducible).
    """
    if name.startswith(TIMM_PREFIX):
        factory: ModelFactory = _timm_backbone
        options = {"timm_name": name[len(TIMM_PREFIX) :], **options}
    elif name in MODELS:
        factory = MODELS[name]
    else:
        raise UnknownModelError(
            f"unknown model {name!r}; available: {', '.join(available_models())}"
        )
    _check_options(name, factory, options)
    if seed is None:
        return factory(num_classes=num_classes, **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(num_classes=num_classes, **options)


def check_timm_names(config: ModelConfig) -> None:
    """Fail in one line if ``model.private`` or ``model.proxy`` is a ``timm:<name>`` timm does
    not know. Configuration checks cannot ask timm (it imports torch), so a run asks this
    before it loads any data."""
    for key in ("private", "proxy"):
        name = getattr(config, key)
        if name.startswith(TIMM_PREFIX):
            import timm

            if not timm.is_model(name[len(TIMM_PREFIX):]):
                raise ConfigError(f"model.{key} = {name!r}: timm has no model "
                                  f"{name[len(TIMM_PREFIX):]!r} (see timm.list_models())")


class ModelOptionsError(ValueError):
    """Options a model does not take, e.g. images for a model of feature vectors."""


def _check_options(name: str, factory: ModelFactory, options: dict[str, Any]) -> None:
    accepted = [p for p in inspect.signature(factory).parameters if p != "num_classes"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ModelOptionsError(
            f"model {name!r} does not take option(s) {', '.join(unknown)} (it takes: "
            f"{', '.join(accepted)}); choose a model for these inputs"
        )


def load_pretrained(module: nn.Module, path: str | Path) -> nn.Module:
    """Copy the weights saved at ``path`` (a ``state_dict``, or a checkpoint holding one under
    ``state_dict`` or ``model``) into ``module``, for pretrained weights a user has locally.

    Parameters whose name and shape match are loaded; the rest (typically the classifier
    head, sized for another number of classes) keep their initialisation, and both sets are
    logged. Nothing is downloaded. A file that matches no parameter is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pretrained weights not found (model.weights)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a foreign or truncated file
        raise ValueError(f"{path}: not a readable weights file ({type(error).__name__})"
                         ) from None
    for key in ("state_dict", "model"):
        if isinstance(saved, dict) and isinstance(saved.get(key), dict):
            saved = saved[key]
    own = module.state_dict()
    matching = {k: v for k, v in saved.items()
                if k in own and isinstance(v, torch.Tensor) and v.shape == own[k].shape}
    if not matching:
        raise ValueError(f"{path}: no parameter matches the model's names and shapes")
    module.load_state_dict(matching, strict=False)
    kept = sorted(set(own) - set(matching))
    log.info("%s: loaded %d of %d tensors; kept the initialisation of %s", path, len(matching),
             len(own), ", ".join(kept) or "none")
    return module


def _conv_output_size(size: int, kernel: int, padding: int = 0, stride: int = 1) -> int:
    return (size + 2 * padding - kernel) // stride + 1


# --------------------------------------------------------------------------- MLP


def mlp(
    *,
    num_classes: int,
    in_channels: int = 1,
    image_size: int = 28,
    hidden: tuple[int, ...] = (200, 200),
) -> nn.Module:
    """The ProxyFL paper's MLP: flattened image → 200 → 200 → classes, ReLU.

    Kalra et al., "Decentralized federated learning through proxy model sharing",
    Nature Communications 2023, arXiv 2111.11343: the private and proxy model of the
    MNIST / Fashion-MNIST benchmarks (784-200-200-10, 199,210 parameters on 28×28 images).
    The input width generalises to ``in_channels · image_size²``.
    """
    widths = [in_channels * image_size * image_size, *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for width_in, width_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- LeNet-5


def lenet5(*, num_classes: int, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """LeNet-5 (LeCun, Bottou, Bengio & Haffner, Proc. IEEE 1998), with today's layers.

    C1 6@5×5 → S2 2×2 → C3 16@5×5 → S4 2×2 → C5 120 → F6 84 → classes, tanh activations and
    average-pool subsampling as in the original. The original's trainable subsampling
    coefficients, partial C3 connectivity and RBF output are replaced by plain average
    pooling, full connectivity and a linear output. Inputs smaller than the original's
    32×32 field are zero-padded up to it (28×28 MNIST → 61,706 parameters). Bounded
    activations also suit DP-SGD (Papernot et al., "Tempered sigmoid activations for deep
    learning with differential privacy", AAAI 2021, arXiv 2007.14191).
    """
    padding = max(0, math.ceil((32 - image_size) / 2))
    size = _conv_output_size(image_size, 5, padding) // 2
    size = _conv_output_size(size, 5) // 2
    if size < 1:
        raise ValueError(f"lenet5: image_size {image_size} is too small for two 5x5 convs")
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=padding),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * size * size, 120),  # C5: a 5x5 conv over a 5x5 map is a linear layer
        nn.Tanh(),
        nn.Linear(120, 84),
        nn.Tanh(),
        nn.Linear(84, num_classes),
    )


# --------------------------------------------------------------------------- CNN1 / CNN2


def _two_conv_pool_size(image_size: int, kernel: int) -> int:
    """Side of the feature map after two (unpadded conv ``kernel``, 2×2 max pool) stages."""
    size = image_size
    for _ in range(2):
        size = _conv_output_size(size, kernel) // 2
    if size < 1:
        raise ValueError(f"image_size {image_size} is too small for two {kernel}x{kernel} "
                         "conv + 2x2 pool stages")
    return size


def cnn1(*, num_classes: int, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """CNN1 of the ProxyFL benchmarks (Kalra et al., Nat Commun 2023, arXiv 2111.11343): the
    small CNN, CIFAR-10's proxy.

    Two unpadded 3×3 convolutions with 6 and 16 channels, each followed by ReLU and 2×2 max
    pooling, a 64-unit ReLU layer and a linear output: the layer sizes of the authors'
    published experiments (27,254 parameters on 28×28 MNIST, 38,626 on CIFAR-10).
    """
    size = _two_conv_pool_size(image_size, 3)
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * size * size, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def cnn2(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """CNN2 of the ProxyFL benchmarks (Kalra et al., Nat Commun 2023, arXiv 2111.11343): the
    wide CNN, CIFAR-10's private model.

    Two unpadded 3×3 convolutions with 128 channels, each followed by ReLU and 2×2 max
    pooling, then a linear output: the layer sizes of the authors' published experiments
    (197,258 parameters on CIFAR-10).
    """
    size = _two_conv_pool_size(image_size, 3)
    return nn.Sequential(
        nn.Conv2d(in_channels, 128, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(128, 128, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128 * size * size, num_classes),
    )


# --------------------------------------------------------------------------- patch CNN


def patch_cnn(
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int | None = None,
    widths: tuple[int, ...] = (16, 32, 64),
) -> nn.Module:
    """A small all-convolutional patch classifier, for slide training on CPUs.

    One stride-2 3×3 convolution, GroupNorm (Wu & He, ECCV 2018; DP-SGD needs per-sample
    normalisation) and ReLU per width, then global average pooling and a linear output, in
    the spirit of the all-convolutional nets of Springenberg et al. (ICLR 2015 workshop,
    arXiv 1412.6806). Global pooling makes it size-agnostic (``image_size`` is accepted and
    ignored) and translation-invariant, as a patch classifier should be. The defaults have
    23,938 parameters for 2 classes.
    """
    del image_size  # global pooling: any patch size
    layers: list[nn.Module] = []
    channels = in_channels
    for width in widths:
        layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1),
                   nn.GroupNorm(group_norm_groups(width, 8), width), nn.ReLU()]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def patch_cnn_small(*, num_classes: int, in_channels: int = 3,
                    image_size: int | None = None) -> nn.Module:
    """``patch_cnn`` at half the width (8, 16, 32): a cheap DP proxy (6,210 parameters)."""
    return patch_cnn(num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                     widths=(8, 16, 32))


# --------------------------------------------------------------------------- attention MIL


class GatedAttentionMIL(nn.Module):
    """Gated attention-based multiple-instance pooling and classifier.

    Ilse, Tomczak & Welling, "Attention-based deep multiple instance learning", ICML 2018,
    arXiv 1802.04712, eq. 9: for instance embeddings h_k = ReLU(W_e x_k),
    a_k = softmax_k(wᵀ(tanh(V h_k) ⊙ sigm(U h_k))), the bag embedding is z = Σ_k a_k h_k and
    the slide logits are a linear map of z.

    Input: one bag ``(N, D)`` or a padded batch of bags ``(B, N, D)`` with an optional
    boolean ``mask`` ``(B, N)`` marking real instances. ``forward`` returns logits (``(C,)``
    for one bag, ``(B, C)`` for a batch), so generic losses apply; ``attend`` returns the
    logits and the attention weights. Batching bags keeps the batch dimension first, which
    is what per-sample (per-slide) DP gradients need.
    """

    def __init__(
        self, *, in_features: int, num_classes: int, embed_dim: int, attention_dim: int
    ) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_features, embed_dim), nn.ReLU())
        self.attention_tanh = nn.Sequential(nn.Linear(embed_dim, attention_dim), nn.Tanh())
        self.attention_gate = nn.Sequential(nn.Linear(embed_dim, attention_dim), nn.Sigmoid())
        self.attention_score = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(embed_dim, num_classes)

    def attend(
        self, bags: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slide logits and attention weights (summing to 1 over each bag's instances)."""
        single = bags.dim() == 2
        if single:
            bags = bags.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
        if bags.dim() != 3:
            raise ValueError(
                f"attention_mil: expected (N, D) or (B, N, D), got {tuple(bags.shape)}"
            )
        h = self.embed(bags)
        scores = self.attention_score(self.attention_tanh(h) * self.attention_gate(h)).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attention = torch.softmax(scores, dim=1)
        logits = self.classifier(torch.einsum("bn,bnd->bd", attention, h))
        if single:
            return logits.squeeze(0), attention.squeeze(0)
        return logits, attention

    def forward(self, bags: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(bags, mask)[0]


def attention_mil(
    *, num_classes: int, in_features: int = 512, embed_dim: int = 500, attention_dim: int = 128
) -> nn.Module:
    """Gated attention-MIL head over patch feature vectors; the paper's sizes M=500, L=128."""
    return GatedAttentionMIL(
        in_features=in_features,
        num_classes=num_classes,
        embed_dim=embed_dim,
        attention_dim=attention_dim,
    )


# --------------------------------------------------------------------------- timm backbones


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


def _timm_backbone(
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

"""Small image and patch CNNs: the ProxyFL paper's MLP, LeNet-5, CNN1 and CNN2, and the patch
classifiers of slide training. Each factory is registered by name in ``federation.catalog``."""

from __future__ import annotations

import math

from torch import nn

from federation.models.group_norm import group_norm_groups


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

"""Models looked up by name (timm style): ``create_model`` and what checks and loads them.

``create_model("mlp", num_classes=10, in_channels=1, image_size=28)`` builds a model from
the registry, ``federation.catalog.MODELS``; options are keyword arguments of the model's
factory. Adding a model means writing one factory function in the module of its family
(``images``, ``mil``, ``scattering``, ``timm_backbones``) and adding its line to the
catalog. Names of the form ``timm:<name>`` build a timm backbone with every BatchNorm
replaced by GroupNorm.

Every model here trains under opacus' per-sample-gradient machinery: no BatchNorm (a sample's
output must not depend on the other samples in its batch), no buffers updated in training.
"""

from __future__ import annotations

import inspect
import logging
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
        from federation.models.timm_backbones import timm_backbone

        factory: ModelFactory = timm_backbone
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

"""Saved models: one self-describing file per hospital and model, what ``predict`` loads.

A run ends by writing ``hospitals/<hospital>/models/<model>.pt`` for every model of every
client, each by the process that trained it. The file is a ``torch.save`` of plain data
(loadable with ``torch.load(weights_only=True)``, so opening a model file never runs code)::

    format            "slidefed-model"
    format_version    1
    slidefed_version  the package version that wrote it
    architecture      registry name (``federation.models``), e.g. "cnn1", "timm:resnet18"
    model_options     keyword options that rebuild it with ``create_model`` (num_classes, ...)
    state_dict        the parameters
    hospital, model   whose model it is, and its name in the algorithm (private, proxy, ...)
    algorithm, round, seed
    shared            true when the model (or its updates) left the hospital during training
    data              what it was trained on: ``ClientData.describe()`` (for slides: target
                      mpp, patch size, normalisation, aggregation, privacy unit)
    decision          what turns outputs into calls (slides: ``threshold``, chosen on the
                      validation slides, and ``aggregation``, the slide aggregator's card:
                      top-k's ``k`` or a fitted attention head's weights, which never leave
                      the hospital; ``federation.evaluation.aggregation``)
    privacy           {"dp": bool, "epsilon", "delta", "unit"}: the (ε, δ) the model was
                      trained under and what one unit is (record, slide or patch)

Every problem reading one is a ``ModelFileError`` naming the file.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from federation.models import create_model
from slidefed.atomic import atomic_path

FORMAT_NAME = "slidefed-model"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("architecture", "model_options", "state_dict", "hospital", "model", "data",
                 "decision", "privacy")


class ModelFileError(ValueError):
    """A model file that cannot be used; ``str()`` is ``<path>: <reason>``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")


def save_model(path: Path, module: nn.Module, **card: Any) -> None:
    """Write ``module`` with its description ``card`` (the keys listed above) atomically."""
    missing = [k for k in REQUIRED_KEYS if k not in card and k != "state_dict"]
    if missing:
        raise ValueError(f"save_model: missing {', '.join(missing)}")
    document = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "slidefed_version": version("slidefed"), **card,
                "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}}
    with atomic_path(path) as tmp:
        torch.save(document, tmp)


def read_model_file(path: str | Path) -> dict[str, Any]:
    """The checked contents of a model file (the module is not built)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(path, "model file not found")
    try:
        document = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a truncated or foreign file
        raise ModelFileError(path, f"not a readable slidefed model file "
                                   f"({type(error).__name__})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise ModelFileError(path, "not a slidefed model file")
    if document.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(path, f"model format version {document.get('format_version')} is "
                                   f"not {FORMAT_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in document]
    if missing:
        raise ModelFileError(path, f"missing {', '.join(missing)}")
    return document


def _reason(error: BaseException) -> str:
    """The first line of ``error`` that says something (torch's load errors open with a
    heading line, "Error(s) in loading state_dict for X:", and give the reason below)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if not line.endswith(":")), lines[0] if lines
                else type(error).__name__)


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The module saved at ``path``, in eval mode, and its contents."""
    document = read_model_file(path)
    options = dict(document["model_options"])
    architecture = document["architecture"]
    try:
        module = create_model(architecture, **options)
        fit = module.load_state_dict(document["state_dict"], strict=False)
    except (KeyError, TypeError, RuntimeError, ValueError) as error:
        raise ModelFileError(path, f"cannot rebuild {architecture!r} ({_reason(error)})"
                             ) from None
    if fit.missing_keys or fit.unexpected_keys:
        names = [f"{what} {', '.join(keys)}" for what, keys in
                 (("missing", fit.missing_keys), ("unexpected", fit.unexpected_keys)) if keys]
        raise ModelFileError(path, f"cannot rebuild {architecture!r}: the saved weights do "
                                   f"not fit this version's model ({'; '.join(names)}); it was "
                                   f"saved by slidefed {document.get('slidefed_version')}")
    return module.eval(), document

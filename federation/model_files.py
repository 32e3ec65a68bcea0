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
    decision          empty: what turns outputs into calls is the hospital's own, in its
                      decision card (below); files written before the cards held it here
    privacy           {"dp": bool, "epsilon", "delta", "unit"}: the (ε, δ) the model was
                      trained under and what one unit is (record, slide or patch)

A model file holds only what training released, so a shared model's file (the proxy) can go
to another hospital. What the hospital chose on its own data afterwards, without DP, is its
**decision card** ``models/<model>.decision`` beside it (``save_decision``), written for
slide models and read by ``predict``, ``evaluate`` and ``heatmap`` at that hospital: the
``threshold`` chosen on its validation slides (an exact function of their scores) and
``aggregation``, the slide aggregator's card (top-k's ``k``, or a gated attention head fitted
on its training slides; ``federation.evaluation.aggregation``). The card never leaves the
hospital; another hospital using the model chooses its own on its own slides.

Every problem reading one is a ``ModelFileError`` naming the file.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from federation.models import create_model
from formats.atomic import atomic_path

FORMAT_NAME = "slidefed-model"
FORMAT_VERSION = 1
DECISION_FORMAT = "slidefed-decision"
DECISION_SUFFIX = ".decision"  # not .pt: ``models/*.pt`` are the model files
PRIVATE_NOTE = ("chosen on this hospital's own slides, without DP: a private output of the "
                "hospital, never shared")
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


def decision_path(model_path: str | Path) -> Path:
    """Where the hospital keeps the decision card of the model file at ``model_path``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + DECISION_SUFFIX)


def save_decision(model_path: Path, decision: dict[str, Any], **who: Any) -> None:
    """Write the decision card (``threshold``, ``aggregation``) of the model file at
    ``model_path`` beside it, atomically; ``who`` names its hospital and model."""
    document = {"format": DECISION_FORMAT, "format_version": FORMAT_VERSION,
                "slidefed_version": version("slidefed"), **who, "private": PRIVATE_NOTE,
                **decision}
    with atomic_path(decision_path(model_path)) as tmp:
        torch.save(document, tmp)


def read_decision(model_path: str | Path, document: dict[str, Any]) -> dict[str, Any]:
    """The decision of the model file at ``model_path`` (contents ``document``): its hospital's
    card beside it, or what a file written before the cards holds itself; empty when there is
    neither (a model that needs none, or a shared model away from its hospital)."""
    inline = document.get("decision") or {}
    if inline:
        return dict(inline)
    path = decision_path(model_path)
    if not path.is_file():
        return {}
    try:
        card = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # as read_model_file
        raise ModelFileError(path, f"not a readable decision card "
                                   f"({type(error).__name__})") from None
    if not isinstance(card, dict) or card.get("format") != DECISION_FORMAT:
        raise ModelFileError(path, "not a slidefed decision card")
    if card.get("model") != document.get("model") or card.get("hospital") != document.get(
            "hospital"):
        raise ModelFileError(path, f"is the card of {card.get('hospital')}'s "
                                   f"{card.get('model')}, not of {document.get('hospital')}'s "
                                   f"{document.get('model')} beside it")
    return {k: v for k, v in card.items() if k in ("threshold", "aggregation")}


def decision_threshold(model_path: str | Path, decision: dict[str, Any]) -> float:
    """The decision threshold of ``decision``; a ``ModelFileError`` explains a missing one."""
    if "threshold" not in decision:
        raise ModelFileError(model_path, f"no decision threshold: it is chosen on the model's "
                                         f"hospital's validation slides and kept there, in "
                                         f"{decision_path(model_path).name} beside the model "
                                         "file; use the model where that card is")
    return float(decision["threshold"])

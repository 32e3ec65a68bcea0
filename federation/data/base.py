"""What the engine needs of one client's data, whatever the data are (images, patch bags).

A ``ClientData`` is a training set indexed by *privacy unit* (an image, a slide, or a patch),
a held-out set the round loop scores models on, and what models and metrics need to know
(classes, the options that build a model for these inputs, the metrics that apply). The
algorithms and the round loop see only this interface, so a new kind of data is a new
subclass and one loader, not a fork of the engine.

Batches are ``Batch(inputs, labels, groups)``: ``groups`` maps each row to the
privacy unit it belongs to (``None`` when every row is its own unit), which is what per-unit
clipping in ``federation.privacy`` needs when a slide contributes several patches to a step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from federation.config import ConfigError


class Batch(NamedTuple):
    """One training step's rows: inputs ``(B, ...)``, int64 labels ``(B,)`` and, when units
    span several rows, each row's unit ``0..S-1`` (int64 ``(B,)``)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor | None = None


class ClientData(ABC):
    """One client's data as the engine sees it.

    ``name`` is the client's name in the run directory (a hospital's name, ``client_<k>``).
    ``unit`` names what one privacy unit is ("record" for an image, "slide", "patch"), and so
    what the ε of a DP model trained on these data protects. ``eval_split`` names the split
    ``evaluate`` scores (the round loop writes it in ``metrics.csv``).
    """

    name: str
    unit: str
    eval_split: str
    num_classes: int

    @property
    @abstractmethod
    def num_units(self) -> int:
        """Privacy units in the training set: n in DP-SGD's sampling rate q = B / n, and the
        weight of this client in data-weighted averages."""

    @abstractmethod
    def model_options(self) -> dict[str, Any]:
        """Keyword options that build a model for these inputs (e.g. ``in_channels``,
        ``image_size``), passed to ``federation.models.create_model``."""

    @abstractmethod
    def epoch(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """One shuffled pass over the training set in batches of ``batch_size`` units (for
        models trained without DP)."""

    @abstractmethod
    def sampled(self, unit_batches: Iterable[list[int]], generator: torch.Generator
                ) -> Iterator[Batch]:
        """The rows of each batch of unit indices (Poisson-sampled by DP-SGD); a unit that
        spans several rows contributes a bounded number of them, chosen with ``generator``."""

    @abstractmethod
    def evaluate(self, module: nn.Module) -> dict[str, float]:
        """Metrics of ``module`` on the held-out split ``eval_split``."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What a saved model must record about the data it was trained on (kind, inputs,
        normalisation), so that it is later applied to data prepared the same way."""

    def unit_inputs(self) -> Iterator[torch.Tensor]:
        """The model input of each training unit in turn, without augmentation: what a DP
        statistic over units (``federation.algorithms.feature_centre``) reads. Not every kind of
        data offers it: the others refuse with a ``ConfigError``."""
        raise ConfigError(f"{self.name}: a fixed-feature model (scattering_linear) needs each "
                          f"training unit's patches, which {type(self).__name__} does not give; "
                          "use it on patch bags (data.name: bags)")

    def calibrate(self, module: nn.Module) -> dict[str, Any]:
        """Settings chosen on held-out data that a saved model needs to make decisions (a
        slide model's decision threshold); none by default."""
        return {}

    def write_records(self, directory: Path) -> None:
        """Write what this client keeps about its data into its own ``directory`` (a
        hospital's slide splits); nothing by default."""
        del directory  # images keep no records

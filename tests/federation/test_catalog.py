"""federation.catalog: one list of names, each resolving to its implementation, and a
configuration checked against it without torch or opacus."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from federation import catalog
from federation.algorithms import ALGORITHMS, Algorithm
from federation.client import OPTIMIZERS
from federation.data import DATASETS, PARTITIONERS
from federation.data.images import DatasetSpec
from federation.models import create_model
from federation.privacy.clipping import MECHANISMS, Mechanism
from federation.transport.topology import Topology

REPO = Path(__file__).resolve().parents[2]


def test_the_engines_registries_are_the_catalog():
    assert ALGORITHMS is catalog.ALGORITHMS
    assert DATASETS is catalog.DATASETS
    assert PARTITIONERS is catalog.PARTITIONERS
    assert OPTIMIZERS is catalog.OPTIMIZERS


@pytest.mark.parametrize("registry, is_right_kind", [
    (catalog.ALGORITHMS, lambda obj: isinstance(obj, type) and issubclass(obj, Algorithm)),
    (catalog.DATASETS, lambda obj: isinstance(obj, DatasetSpec)),
    (catalog.PARTITIONERS, lambda obj: callable(obj) and obj.__module__.endswith("partition")),
    (catalog.OPTIMIZERS, lambda obj: isinstance(obj([nn.Parameter(torch.zeros(1))], 1e-3, 0.0),
                                                torch.optim.Optimizer)),
    (catalog.MECHANISMS, lambda obj: isinstance(obj, Mechanism)),
    (catalog.TOPOLOGIES, lambda obj: isinstance(obj, type) and issubclass(obj, Topology)),
    (catalog.MODELS, callable),
], ids=lambda value: getattr(value, "kind", ""))
def test_every_catalog_entry_resolves_to_an_object_of_its_kind(registry, is_right_kind):
    assert len(registry) > 0
    wrong = [name for name in registry if not is_right_kind(registry[name])]
    assert wrong == []


@pytest.mark.parametrize("name", sorted(catalog.MODELS))
def test_every_catalogued_model_builds(name):
    assert isinstance(create_model(name, num_classes=2, seed=0), nn.Module)


def test_the_mechanism_table_of_privacy_has_exactly_the_catalogued_names():
    # The one table the catalog points into instead of replacing (see catalog's docstring).
    assert sorted(MECHANISMS) == sorted(catalog.MECHANISMS)


def test_unknown_names_and_names_added_twice():
    registry = catalog.Registry("thing", {"a": "federation.transport.topology:Ring"})
    assert "a" in registry and "b" not in registry
    with pytest.raises(KeyError):
        registry["b"]
    registry.add("b", Topology)
    assert registry["b"] is Topology
    with pytest.raises(ValueError, match="thing name 'a' is registered twice"):
        registry.add("a", Topology)


def test_a_configuration_is_validated_without_torch_or_opacus():
    probe = ("import federation.config as c; c.load_config('configs/federation_demo.yaml'); "
             "import sys; assert 'torch' not in sys.modules and 'opacus' not in sys.modules")
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_every_algorithms_models_have_names_report_shared_metrics_can_choose():
    names = {name for algorithm in ALGORITHMS for name in ALGORITHMS[algorithm].roles}
    assert names <= set(catalog.MODEL_NAMES)

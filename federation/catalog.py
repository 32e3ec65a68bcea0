"""Every name a run configuration can choose, and where its implementation lives (timm style).

This is the one list of names of algorithms, data sets (and the client data they make),
partitions, optimizers, DP
mechanisms, topologies and models. Each name maps to ``"module:attribute"``; the code that
needs the object looks it up by name (``ALGORITHMS["proxyfl"]``), which imports the module
then. Listing or checking names imports nothing, so ``federation.config`` validates a
configuration without torch or opacus. Adding an algorithm (or a model, a data set, ...)
means writing its module and adding one line here; tests check that every line resolves to an
object of the right kind.

The engine's registries are these objects: ``federation.algorithms.ALGORITHMS``,
``federation.data.DATASETS`` and ``PARTITIONERS``, ``federation.client.OPTIMIZERS``,
``federation.models.create_model`` and ``federation.transport.topology.make_topology`` look names up
here. The DP mechanisms are the one exception: their table is
``federation.privacy.clipping.MECHANISMS`` and the lines below point into it, so a new
mechanism is a line there and a line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

TIMM_PREFIX = "timm:"
"""Model names ``timm:<name>`` build a timm backbone (with GroupNorm), outside the catalog."""


class Registry(Mapping[str, Any]):
    """Names of one kind mapped to their implementations, imported on first lookup.

    ``name in registry`` and iteration see names only; ``registry[name]`` resolves
    ``"module:attribute"`` (a dotted attribute may step into a mapping by key).
    """

    def __init__(self, kind: str, targets: Mapping[str, str]) -> None:
        self.kind = kind
        self._targets: dict[str, Any] = dict(targets)

    def __getitem__(self, name: str) -> Any:
        target = self._targets[name]
        if not isinstance(target, str):
            return target
        module, _, attribute = target.partition(":")
        found: Any = importlib.import_module(module)
        for part in attribute.split("."):
            found = found[part] if isinstance(found, Mapping) else getattr(found, part)
        return found

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)

    def add(self, name: str, implementation: Any) -> None:
        """Add ``name`` at run time (plug-ins, tests): ``implementation`` is the object itself."""
        if name in self._targets:
            raise ValueError(f"{self.kind} name {name!r} is registered twice")
        self._targets[name] = implementation


ALGORITHMS = Registry("algorithm", {
    "regular": "federation.algorithms.regular:Regular",
    "regular_dp": "federation.algorithms.regular:RegularDP",
    "joint": "federation.algorithms.joint:Joint",
    "fedavg": "federation.algorithms.fedavg:FedAvg",
    "avgpush": "federation.algorithms.avgpush:AvgPush",
    "cwt": "federation.algorithms.cwt:CyclicWeightTransfer",
    "fml": "federation.algorithms.fml:FederatedMutualLearning",
    "proxyfl": "federation.algorithms.proxyfl:ProxyFL",
})

# Algorithms whose messages DP-SGD does not protect (joint: raw gradient sums every step).
# A configuration refuses them with dp.enabled, so nothing they share is labelled DP.
WITHOUT_DP = frozenset({"joint"})

DATASETS = Registry("data set", {
    "mnist": "federation.data.images:MNIST",
    "fashion_mnist": "federation.data.images:FASHION_MNIST",
    "cifar10": "federation.data.images:CIFAR10",
})

# What ``data.name`` may be: an image data set (partitioned over clients in memory) or
# patch bags (one hospital per client).
CLIENT_DATA = Registry("data", {
    **{name: "federation.data.image_clients:load_image_clients" for name in DATASETS},
    "bags": "federation.data.slides:load_slide_clients",
})

PARTITIONERS = Registry("partition", {
    "iid": "federation.data.partition:iid",
    "class_skew": "federation.data.partition:class_skew",
    "dirichlet": "federation.data.partition:dirichlet",
})

OPTIMIZERS = Registry("optimizer", {
    "adam": "federation.client:adam",
    "sgd": "federation.client:sgd",
})

MECHANISMS = Registry("DP mechanism", {
    "bookkeeping": "federation.privacy.clipping:MECHANISMS.bookkeeping",
    "ghost": "federation.privacy.clipping:MECHANISMS.ghost",
    "hooks": "federation.privacy.clipping:MECHANISMS.hooks",
})

TOPOLOGIES = Registry("topology", {
    "exponential": "federation.transport.topology:ExponentialGraph",
    "ring": "federation.transport.topology:Ring",
    "full": "federation.transport.topology:FullyConnected",
})

AGGREGATIONS = Registry("slide aggregation", {
    "top_k": "federation.evaluation.aggregation:fit_top_k",
    "attention_mil": "federation.evaluation.aggregation:fit_attention_mil",
})

MODELS = Registry("model", {
    "mlp": "federation.models.images:mlp",
    "lenet5": "federation.models.images:lenet5",
    "cnn1": "federation.models.images:cnn1",
    "cnn2": "federation.models.images:cnn2",
    "patch_cnn": "federation.models.images:patch_cnn",
    "patch_cnn_small": "federation.models.images:patch_cnn_small",
    "scattering_linear": "federation.models.scattering:scattering_linear",
    "attention_mil": "federation.models.mil:attention_mil",
})


# What the round loop's metric rows can name: the models of an algorithm's clients (its
# ``roles``), the splits they are scored on, and the metrics of a round. ``report.shared_metrics``
# patterns are checked against them, so a typo fails at configuration time instead of
# silently sharing nothing; tests check that every algorithm and client data keep to them.
MODEL_NAMES = ("private", "proxy", "shared")
SPLITS = ("train", "test", "validation")
ROUND_METRICS = ("accuracy", "auc", "loss")


def available_models() -> list[str]:
    """Catalogued model names, plus the ``timm:<name>`` family."""
    return sorted(MODELS) + [f"{TIMM_PREFIX}<name>"]

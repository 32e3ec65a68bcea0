"""Federation config: YAML -> typed config, one-line errors, --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from federation.config import (
    ConfigError,
    FederationConfig,
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
)
from slidefed.cli import main

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs" / "benchmarks").glob("*.yaml")) + [
    REPO / "configs" / "federation_demo.yaml"
]


def _write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_are_valid_and_round_trip(path: Path, tmp_path: Path) -> None:
    config = load_config(path)
    again = load_config(_write(tmp_path, dump_config(config)))
    assert again == config


def test_benchmark_configs_hold_the_papers_settings() -> None:
    for path in (REPO / "configs" / "benchmarks").glob("*.yaml"):
        config = load_config(path)
        assert config.clients == 8 and config.data.partition == "class_skew"
        assert config.data.p_major == 0.8
        assert (config.optim.name, config.optim.lr, config.optim.weight_decay) == (
            "adam", 1e-3, 1e-4)
        assert config.optim.batch_size == 250
        assert (config.dp.max_grad_norm, config.dp.noise_multiplier) == (1.0, 1.0)
        # the paper's alpha; beta 0, slidefed's guaranteed default (the paper's 0.5 is an override)
        assert (config.dml.alpha, config.dml.beta) == (0.5, 0.0)
        expected = (200, 3000) if config.data.name == "cifar10" else (300, 1000)
        assert (config.rounds, config.data.samples_per_client) == expected


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "")) == FederationConfig()


@pytest.mark.parametrize(
    "text, message",
    [
        ("dp:\n  noise: 1.0\n",
         "config.yaml: unknown key 'dp.noise' (did you mean 'dp.noise_multiplier'?)"),
        ("round: 3\n", "config.yaml: unknown key 'round' (did you mean 'rounds'?)"),
        ("rounds: ten\n", "config.yaml: rounds = 'ten': expected a whole number"),
        ("rounds: 0\n", "config.yaml: rounds = 0: must be positive"),
        ("rounds: 2.5\n", "config.yaml: rounds = 2.5: expected a whole number"),
        ("comm_timeout_s: 0\n", "config.yaml: comm_timeout_s = 0.0: must be positive"),
        ("comm_timeout_s: .inf\n", "config.yaml: comm_timeout_s = inf: must be finite"),
        ("clients: true\n", "config.yaml: clients = True: expected a whole number"),
        ("dp:\n  enabled: 1\n", "config.yaml: dp.enabled = 1: expected true or false"),
        ("dp:\n  delta: 2\n", "config.yaml: dp.delta = 2.0: must lie in (0, 1)"),
        ("optim:\n  lr: .nan\n", "config.yaml: optim.lr = nan: must be finite"),
        ("algorithm: proxyfll\n", "config.yaml: algorithm = 'proxyfll': unknown name"),
        ("model:\n  proxy: resnet\n", "config.yaml: model.proxy = 'resnet': unknown model"),
        ("data:\n  partition: skew\n", "config.yaml: data.partition = 'skew': unknown name"),
        ("seed: null\n", "config.yaml: seed must not be null"),
        ("dp: 3\n", "config.yaml: 'dp' must be a mapping of keys"),
        ("- 1\n- 2\n", "config.yaml: expected a mapping of keys at the top level"),
        ("rounds: [1\n", "config.yaml: line 2"),
        ("optim:\n  batch_size: 500\ndata:\n  samples_per_client: 100\n",
         "config.yaml: optim.batch_size = 500 exceeds data.samples_per_client = 100"),
        ("rounds: 3\nseed: 1\nrounds: 4\n", "config.yaml: line 3 duplicate key 'rounds'"),
        ("dp:\n  delta: 0.001\n  enabled: true\n  delta: 0.1\n",
         "config.yaml: line 4 duplicate key 'dp.delta'"),
        ("dp:\n  noise_multiplier: 0\n",
         "config.yaml: dp.noise_multiplier = 0.0 with dp.enabled = true adds no noise"),
        ("algorithm: joint\n", "config.yaml: algorithm = joint shares unclipped, noiseless "
         "gradients and cannot train with DP; set dp.enabled = false"),
        ("report:\n  shared_metrics: [accuracy]\n", "config.yaml: report.shared_metrics = "
         "('accuracy',): 'accuracy' is not model/split/metric (e.g. '*/test/accuracy')"),
        ("report:\n  shared_metrics: ['*/test/acuracy']\n", "config.yaml: "
         "report.shared_metrics = ('*/test/acuracy',): '*/test/acuracy': unknown metric "
         "'acuracy'; choose '*' or one of ['accuracy', 'auc', 'loss']"),
        ("report:\n  shared_metrics: ['meme/test/accuracy']\n", "config.yaml: "
         "report.shared_metrics = ('meme/test/accuracy',): 'meme/test/accuracy': unknown model"),
    ],
)
def test_bad_keys_and_values_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, text))
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_what_dp_refuses_is_accepted_without_dp(tmp_path: Path) -> None:
    path = _write(tmp_path, "algorithm: joint\ndp:\n  enabled: false\n  noise_multiplier: 0\n")
    assert load_config(path).algorithm == "joint"
    # the same key twice in different sections is no duplicate
    assert load_config(_write(tmp_path, "dml:\n  alpha: 0.1\nfedavg:\n  client_fraction: 1\n"
                              "data:\n  alpha: 0.3\n")).data.alpha == 0.3
    with pytest.raises(ConfigError, match=r"^--set dp.noise_multiplier=0: dp.noise_multiplier"):
        load_config(path, ["dp.enabled=true", "algorithm=proxyfl", "dp.noise_multiplier=0"])


def test_floats_are_read_as_written_even_without_a_dot(tmp_path: Path) -> None:
    # PyYAML reads "1e-3" as a string (YAML 1.1); a learning rate must still be 0.001.
    config = load_config(_write(tmp_path, "optim:\n  lr: 1e-3\n  weight_decay: 0\n"))
    assert config.optim.lr == 0.001 and isinstance(config.optim.weight_decay, float)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("dp.enabled=false", ("dp.enabled", False)),
        ("rounds=10", ("rounds", 10)),
        ("dp.delta=null", ("dp.delta", None)),
        ("dp.delta=", ("dp.delta", None)),
        ("data.root=/data/x=y", ("data.root", "/data/x=y")),
        ("optim.lr=1.0e-2", ("optim.lr", 0.01)),
        ("algorithm = fedavg", ("algorithm", "fedavg")),
    ],
)
def test_overrides_follow_yaml_scalar_rules(text: str, expected: tuple) -> None:
    assert parse_override(text) == expected


def test_overrides_reach_the_typed_config(tmp_path: Path) -> None:
    path = _write(tmp_path, "algorithm: proxyfl\ndp:\n  enabled: true\n")
    config = load_config(path, ["algorithm=fedavg", "rounds=7", "seed=3", "clients=4",
                                "data.name=fashion_mnist", "data.root=/tmp/x",
                                "dp.enabled=false", "output_dir=out", "dp.delta=null"])
    assert (config.algorithm, config.rounds, config.seed, config.clients) == ("fedavg", 7, 3, 4)
    assert (config.data.name, config.data.root) == ("fashion_mnist", "/tmp/x")
    assert config.dp.enabled is False and config.dp.delta is None
    assert config.output_dir == "out"
    assert config.data.partition == "class_skew"  # untouched keys keep file/default values


@pytest.mark.parametrize(
    "override, message",
    [
        ("dp.noise=1", "--set dp.noise=1: unknown key 'dp.noise'"),
        ("rounds", "--set rounds: expected KEY=VALUE"),
        ("rounds=-1", "--set rounds=-1: rounds = -1: must be positive"),
        ("dp=3", "--set dp=3: 'dp' is a section; set one of its keys, e.g. dp.enabled=..."),
        ("rounds.x=1", "--set rounds.x=1: 'rounds' has no sub-keys"),
        ("optim.batch_size=5000", "--set optim.batch_size=5000: optim.batch_size = 5000 exceeds"),
    ],
)
def test_bad_overrides_name_the_override(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, "rounds: 3\n"), [override])
    assert str(caught.value).startswith(message)


def test_config_is_frozen() -> None:
    config = config_from_dict({})
    with pytest.raises(AttributeError):
        config.rounds = 3  # type: ignore[misc]


def test_dumped_config_is_plain_yaml() -> None:
    loaded = yaml.safe_load(dump_config(config_from_dict({"dp": {"delta": None}})))
    assert loaded["dp"]["delta"] is None and loaded["optim"]["lr"] == 1e-3


def test_cli_reports_a_bad_config_in_one_line(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, "dp:\n  noise: 1.0\n")
    assert main(["federate", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err == ("error: config.yaml: unknown key 'dp.noise' "
                   "(did you mean 'dp.noise_multiplier'?)\n")
    assert main(["federate", "--config", str(path), "--set", "dp.noise_multiplier=x"]) == 1
    assert capsys.readouterr().err.startswith("error: config.yaml: unknown key 'dp.noise'")
    assert main(["federate", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml: cannot read" in capsys.readouterr().err


def test_dp_config_built_in_code_is_checked_like_a_loaded_one():
    from federation.config import DPConfig
    from federation.privacy.clipping import MECHANISMS

    assert DPConfig().mechanism in MECHANISMS
    with pytest.raises(ConfigError, match=r"^DPConfig: delta = 1.0: must lie in \(0, 1\)$"):
        DPConfig(delta=1.0)

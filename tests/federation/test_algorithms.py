"""Every algorithm on the local backend: they learn, share only what they should, and
their shared mechanisms (mutual learning, push-averaging, weighted averaging, data-parallel
steps, ε budget) do what their papers' update rules say."""

from __future__ import annotations

import csv
import logging
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from federation_synthetic import small_config, write_synthetic_digits

from federation.algorithms import ALGORITHMS
from federation.algorithms.fedavg import FedAvg
from federation.algorithms.joint import Joint
from federation.client import distillation_loss
from federation.config import ConfigError, config_from_dict
from federation.data import load_client_data
from federation.loop import run_federation
from federation.privacy.accounting import epsilon_from_history
from federation.privacy.randomness import fixed_secrets_for_tests
from federation.transport.comm import LocalCommunicator
from federation.transport.topology import make_topology


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_synthetic_digits(tmp_path_factory.mktemp("digits"))


def _config(digits: Path, out: Path, **overrides):
    return config_from_dict(small_config(digits, out, **overrides))


def _algorithm(config):
    comm = LocalCommunicator(config.clients)
    data = load_client_data(config, comm.owned)
    return ALGORITHMS[config.algorithm](config, comm, data), comm


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_learns_the_easy_task(digits: Path, tmp_path: Path, name: str) -> None:
    # IID data, so that every method, CWT included, is judged on a task it can solve.
    config = _config(digits, tmp_path, algorithm=name, rounds=5, checkpoint_every=0,
                     **{"data.partition": "iid"})
    summary = run_federation(config)
    reported = summary["final"][summary["reported_model"]]["accuracy"]
    assert reported["mean"] > 0.35  # chance is 0.1
    assert summary["reported_model"] == ALGORITHMS[name].reported_model
    first_round = [float(r["value"]) for r in _rows(tmp_path / "metrics.csv")
                   if r["round"] == "1" and r["metric"] == "accuracy"
                   and r["model"] == summary["reported_model"]]
    assert len(first_round) == config.clients


def test_proxyfl_sends_only_proxies(digits: Path, tmp_path: Path) -> None:
    """Every buffer that leaves a client is that client's proxy at the time, never its
    private model; the sizes differ (LeNet-5 private, MLP proxy), so the log proves it too."""
    config = _config(digits, tmp_path, rounds=3, **{"model.private": "lenet5"})
    algorithm, comm = _algorithm(config)
    proxy_numel = algorithm.clients[0].models["proxy"].flat.numel
    private_numel = algorithm.clients[0].models["private"].flat.numel
    assert proxy_numel != private_numel
    crossed = []
    real_exchange = comm.exchange

    def spy(outgoing, send_to, recv_from):
        for c, buffer in outgoing.items():
            proxy = algorithm.clients[c].models["proxy"].flat.pack()
            private = algorithm.clients[c].models["private"].flat.pack()
            crossed.append((c, buffer.clone(), proxy.clone(), private.clone()))
        return real_exchange(outgoing, send_to, recv_from)

    comm.exchange = spy
    for t in range(config.rounds):
        algorithm.run_round(t)
    assert len(crossed) == config.rounds * config.clients
    for _, buffer, proxy, private in crossed:
        assert torch.equal(buffer, proxy)
        assert buffer.numel() != private.numel()
    assert comm.sent_log, "nothing was sent"
    assert {(t.op, t.numel) for t in comm.sent_log} == {("exchange", proxy_numel)}
    assert len(comm.sent_log) == config.rounds * config.clients


def test_private_models_never_leave_under_any_algorithm(digits: Path, tmp_path: Path) -> None:
    for name in ("regular", "fml", "proxyfl"):
        config = _config(digits, tmp_path / name, algorithm=name, rounds=2,
                         **{"model.private": "lenet5"})
        algorithm, comm = _algorithm(config)
        for t in range(config.rounds):
            algorithm.run_round(t)
        private = algorithm.clients[0].models["private"].flat.numel
        assert all(t.numel not in (private, private + 1) for t in comm.sent_log), name


def test_push_averaging_and_cyclic_transfer(digits: Path, tmp_path: Path) -> None:
    config = _config(digits, tmp_path, algorithm="avgpush")
    algorithm, _ = _algorithm(config)

    def set_models(values):
        for c, client in algorithm.clients.items():
            client.models["shared"].flat.unpack(torch.full((client.models["shared"].flat.numel,),
                                                           float(values[c])))

    def values():
        return [float(client.models["shared"].flat.pack().mean())
                for client in algorithm.clients.values()]

    k = config.clients
    set_models([1, 2, 4, 8])
    algorithm.mix_with_peers("shared", 1, make_topology("exponential", k))  # hop 2 at t=1
    assert values() == [(v + [1, 2, 4, 8][(c - 2) % k]) / 2 for c, v in enumerate([1, 2, 4, 8])]
    set_models([1, 2, 4, 8])
    algorithm.mix_with_peers("shared", 0, make_topology("ring", k), keep_own=False)
    assert values() == [8, 1, 2, 4]
    set_models([1, 2, 4, 8])
    algorithm.mix_with_peers("shared", 0, make_topology("full", k))
    assert values() == pytest.approx([15 / 4] * k)


def test_weighted_average_ignores_zero_weights(digits: Path, tmp_path: Path) -> None:
    algorithm, _ = _algorithm(_config(digits, tmp_path, algorithm="fedavg"))
    for c, client in algorithm.clients.items():
        flat = client.models["shared"].flat
        flat.unpack(torch.full((flat.numel,), float(c + 1)))
    algorithm.weighted_average("shared", {0: 1.0, 1: 3.0, 2: 0.0, 3: 0.0})
    for client in algorithm.clients.values():
        assert torch.allclose(client.models["shared"].flat.pack(), torch.tensor(7 / 4))


def test_fedavg_samples_the_same_clients_everywhere(digits: Path, tmp_path: Path) -> None:
    config = _config(digits, tmp_path, algorithm="fedavg", rounds=4,
                     **{"fedavg.client_fraction": 0.5})
    algorithm, _ = _algorithm(config)
    twin, _ = _algorithm(config)
    draws = [algorithm.sampled_clients(t) for t in range(20)]
    assert draws == [twin.sampled_clients(t) for t in range(20)]
    assert all(len(s) == 2 for s in draws) and len({frozenset(s) for s in draws}) > 1
    assert isinstance(algorithm, FedAvg)

    run_federation(config)
    epsilons = {(int(r["round"]), int(r["client"])): float(r["epsilon"])
                for r in _rows(tmp_path / "privacy.csv")}
    for t in range(config.rounds):
        for c in range(config.clients):
            before = epsilons.get((t, c), 0.0)
            trained = epsilons[t + 1, c] > before
            assert trained == (c in draws[t]), (t, c)  # only sampled clients spend ε


def test_joint_step_is_the_pooled_gradient_and_models_stay_identical(
    digits: Path, tmp_path: Path
) -> None:
    config = _config(digits, tmp_path, algorithm="joint")
    algorithm, _ = _algorithm(config)
    assert isinstance(algorithm, Joint) and algorithm.steps_per_epoch == 3  # 96 / 32
    module = algorithm.clients[0].models["shared"].module
    batches = [next(client.models["shared"].batches()) for client in algorithm.clients.values()]
    sums = [Joint._gradient_sum(module, batch, [0.0, 0]) for batch in batches]
    combined = sum(sums)
    module.zero_grad()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    F.cross_entropy(module(x), y).backward()
    pooled = torch.cat([p.grad.reshape(-1) for p in module.parameters()])
    assert combined[-1] == len(y)
    assert torch.allclose((combined[:-1] / combined[-1]).float(), pooled, atol=1e-6)

    for t in range(2):
        algorithm.run_round(t)
    first = algorithm.clients[0].models["shared"].flat.pack()
    for client in algorithm.clients.values():
        assert torch.equal(client.models["shared"].flat.pack(), first)


def test_distillation_loss_is_the_dml_objective() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=generator, requires_grad=True)
    teacher = torch.randn(5, 4, generator=generator, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0])
    loss = distillation_loss(logits, y, teacher.detach(), weight=0.3)
    p_teacher = teacher.detach().softmax(1)
    kl = (p_teacher * (p_teacher.log() - logits.log_softmax(1))).sum(1)
    ce = -logits.log_softmax(1)[torch.arange(5), y]
    assert loss.shape == (5,)
    assert torch.allclose(loss, 0.7 * ce + 0.3 * kl, atol=1e-6)
    loss.sum().backward()
    assert teacher.grad is None and logits.grad is not None


def test_dp_changes_the_proxy_and_not_the_data_order(digits: Path, tmp_path: Path) -> None:
    def final_models(dp: bool):
        config = _config(digits, tmp_path, rounds=2, **{"dp.enabled": dp})
        algorithm, _ = _algorithm(config)
        initial = algorithm.clients[1].models["proxy"].flat.pack().clone()
        for t in range(config.rounds):
            algorithm.run_round(t)
        return initial, algorithm.clients[1].models["proxy"].flat.pack().clone(), algorithm

    initial_dp, proxy_dp, with_dp = final_models(True)
    initial_plain, proxy_plain, without_dp = final_models(False)
    assert torch.equal(initial_dp, initial_plain)  # same seed, same start
    assert not torch.allclose(proxy_dp, proxy_plain, atol=1e-3)
    assert with_dp.clients[1].models["proxy"].is_private
    assert not without_dp.clients[1].models["proxy"].is_private
    assert not with_dp.clients[1].models["private"].is_private  # private never DP


def test_epsilon_budget_stops_a_client_before_the_round_that_would_pass_it(
        digits: Path, tmp_path: Path, caplog) -> None:
    # q = 1/3, σ = 1, 3 steps a round: a budget between the ε of two rounds and that of
    # three allows two rounds, and round 3 never starts.
    two, three = (epsilon_from_history([(1.0, 1 / 3, 3 * rounds)], 1e-3) for rounds in (2, 3))
    budget = (two + three) / 2
    config = _config(digits, tmp_path, rounds=5, **{"dp.epsilon_budget": budget})
    with caplog.at_level(logging.WARNING, logger="federation.algorithms.base"):
        run_federation(config)
    rows = _rows(tmp_path / "privacy.csv")
    by_client: dict[int, list[tuple[float, str]]] = {}
    for row in rows:
        by_client.setdefault(int(row["client"]), []).append((float(row["epsilon"]),
                                                             row["status"]))
    for c, spent in by_client.items():
        epsilons = [epsilon for epsilon, _ in spent]
        assert len(epsilons) == config.rounds
        assert epsilons[1] == pytest.approx(two, rel=1e-9), "budget allows exactly two rounds"
        assert epsilons[2:] == [epsilons[1]] * (config.rounds - 2), f"client {c} kept training"
        # the row of round 2 says that ε is final: the next round would pass the budget
        assert [status for _, status in spent] == ["active"] + ["stopped"] * 4
    stopped = [r.getMessage() for r in caplog.records if "would pass its budget" in r.getMessage()]
    assert len(stopped) == config.clients  # logged once per client
    # Private models keep learning: their training losses (kept by each hospital) appear
    # every round.
    metrics = _rows(tmp_path / "hospitals" / "client_0" / "metrics.csv")
    last = [r for r in metrics if r["round"] == "5" and r["split"] == "train"]
    assert {r["model"] for r in last} == {"private"}


def test_a_budget_below_one_round_is_refused_before_training(digits: Path,
                                                             tmp_path: Path) -> None:
    config = _config(digits, tmp_path / "run", **{"dp.epsilon_budget": 0.5})
    with pytest.raises(ConfigError, match=r"^dp.epsilon_budget = 0.5 is below the epsilon of "
                                          r"one round \(9.69 for client 0's proxy\); raise"):
        run_federation(config)
    assert not list((tmp_path / "run").glob("hospitals/*/checkpoints/round_*"))
    assert (tmp_path / "run" / "privacy.csv").read_text().count("\n") == 1  # the header only


def test_the_same_seed_releases_other_proxies_unless_the_secrets_are_fixed(
        digits: Path, tmp_path: Path) -> None:
    def proxies(seed: int, secrets: int | None = None):
        with nullcontext() if secrets is None else fixed_secrets_for_tests(secrets):
            algorithm, _ = _algorithm(_config(digits, tmp_path, seed=seed))
        algorithm.run_round(0)
        return np.concatenate([c.models["proxy"].flat.pack().numpy().copy()
                               for c in algorithm.clients.values()])

    # Everything a peer knows (configuration, seed) does not fix the DP noise or sampling.
    assert not np.array_equal(proxies(0), proxies(0))
    # Given each hospital's secrets a run is reproducible, and the seed still matters.
    assert np.array_equal(proxies(0, secrets=5), proxies(0, secrets=5))
    assert not np.array_equal(proxies(0, secrets=5), proxies(1, secrets=5))


def test_regular_dp_trains_alone_with_dp(digits: Path, tmp_path: Path) -> None:
    """The paper's Regular: a DP model that never travels, with ε accounted per round; with
    DP off it is exactly ``regular``."""
    config = _config(digits, tmp_path / "dp", algorithm="regular_dp", rounds=2)
    algorithm, comm = _algorithm(config)
    for t in range(config.rounds):
        algorithm.run_round(t)
    assert all(client.models["private"].is_private for client in algorithm.clients.values())
    assert comm.sent_log == []
    epsilons = [spent.epsilon for spent in algorithm.privacy().values()]
    assert len(epsilons) == config.clients and min(epsilons) > 0

    def final_private(name: str) -> torch.Tensor:
        plain = _config(digits, tmp_path / name, algorithm=name, rounds=2,
                        **{"dp.enabled": False})
        run, _ = _algorithm(plain)
        for t in range(plain.rounds):
            run.run_round(t)
        return run.clients[1].models["private"].flat.pack()

    assert torch.equal(final_private("regular_dp"), final_private("regular"))


def test_test_sets_follow_the_client_or_the_whole_test_split(digits: Path, tmp_path: Path) -> None:
    """``client``: each test set is skewed like its client's training set (p_major 0.8);
    ``global``: every test set follows the test split's label distribution."""
    def test_label_shares(distribution: str) -> np.ndarray:
        config = _config(digits, tmp_path, **{"data.test_distribution": distribution})
        data = load_client_data(config, range(config.clients))
        return np.stack([np.bincount(d.test.tensors[1].numpy(), minlength=d.num_classes)
                         / len(d.test) for d in data.values()])

    skewed, spread = test_label_shares("client"), test_label_shares("global")
    assert (skewed.max(axis=1) >= 0.75).all()
    assert (spread.max(axis=1) <= 0.2).all()  # 10 classes of about equal size
    assert np.abs(spread - spread[0]).max() <= 0.02  # the same mix for every client

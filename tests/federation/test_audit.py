"""The privacy audit: the ε lower bound and its statistics, the held-out records and
canaries, ``slidefed audit`` on trained runs (a memorising model leaks, a very noisy DP model
does not; slide runs audit their slides), and LiRA with its shadow runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from federation_synthetic import small_config, write_synthetic_digits
from scipy.stats import binom, norm
from slide_bags import slide_config, write_cohort
from torch.utils.data import TensorDataset

from benchmarks.table import read_runs
from federation.audit.lira import lira_scores, logit_confidence
from federation.audit.metrics import (
    clopper_pearson_lower,
    clopper_pearson_upper,
    epsilon_lb_max,
    epsilon_lower_bound,
    score_attack,
    split_epsilon_bound,
    tpr_at_fpr,
)
from federation.audit.records import read_audit_records
from federation.audit.run import COLUMNS, audit_run
from federation.config import ConfigError, config_from_dict
from federation.data.image_clients import load_image_clients
from federation.data.images import load_images
from federation.data.partition import holdout_indices, partition
from federation.loop import run_federation
from slidefed.cli import main

# ---------------------------------------------------------------------------- the statistics


def test_epsilon_lower_bound_matches_hand_computed_values() -> None:
    # All 100 members flagged, none of 100 non-members. At confidence 0.95 each one-sided
    # bound is at 0.975, and Clopper-Pearson has closed forms at the ends:
    # TPR_lo = 0.025^(1/100) = 0.963783, FPR_hi = 1 - 0.025^(1/100) = 0.036217.
    # delta = 0:    log(0.963783 / 0.036217)          = 3.28135
    # delta = 0.01: log((0.963783 - 0.01) / 0.036217) = 3.27092 (either direction)
    assert epsilon_lower_bound(100, 100, 0, 100, 0.0) == pytest.approx(3.28135, abs=1e-4)
    assert epsilon_lower_bound(100, 100, 0, 100, 0.01) == pytest.approx(3.27092, abs=1e-4)
    # 10 of 10 against 0 of 10: log(0.025^0.1 / (1 - 0.025^0.1)) = log(0.69150 / 0.30850)
    assert epsilon_lower_bound(10, 10, 0, 10, 0.0) == pytest.approx(0.80715, abs=1e-4)
    # A test that flags as many non-members as members proves nothing.
    assert epsilon_lower_bound(50, 100, 50, 100, 1e-5) == 0.0
    assert epsilon_lower_bound(0, 100, 0, 100, 1e-5) == 0.0
    # The complement direction binds when the test misses few members but spares many
    # non-members: 99 of 100 against 50 of 100, log((1 - FPR_hi) / (1 - TPR_lo)).
    tpr_lo, fpr_hi = clopper_pearson_lower(99, 100, 0.025), clopper_pearson_upper(50, 100, 0.025)
    assert epsilon_lower_bound(99, 100, 50, 100, 0.0) == pytest.approx(
        math.log((1 - fpr_hi) / (1 - tpr_lo)))
    assert math.log((1 - fpr_hi) / (1 - tpr_lo)) > math.log(tpr_lo / fpr_hi) > 0


@pytest.mark.parametrize("k", [1, 7, 50, 99])
def test_clopper_pearson_bounds_are_the_binomial_tail_inversions(k) -> None:
    n, alpha = 100, 0.025
    low, high = clopper_pearson_lower(k, n, alpha), clopper_pearson_upper(k, n, alpha)
    assert binom.sf(k - 1, n, low) == pytest.approx(alpha)  # P(X >= k | p_lo) = alpha
    assert binom.cdf(k, n, high) == pytest.approx(alpha)  # P(X <= k | p_hi) = alpha
    assert low < k / n < high


def test_tpr_at_low_fpr_is_read_at_or_below_the_target() -> None:
    fpr = np.array([0.0, 0.0005, 0.002, 0.01, 0.5, 1.0])
    tpr = np.array([0.0, 0.1, 0.2, 0.3, 0.9, 1.0])
    assert tpr_at_fpr(fpr, tpr, 0.001) == 0.1
    assert tpr_at_fpr(fpr, tpr, 0.01) == 0.3


def test_threshold_is_chosen_on_one_half_and_counted_on_the_other() -> None:
    rng = np.random.default_rng(0)
    separated = split_epsilon_bound(np.linspace(1, 2, 200), np.linspace(-2, -1, 200), 0.0, rng)
    assert (separated.members, separated.nonmembers) == (100, 100)
    assert (separated.true_positives, separated.false_positives) == (100, 0)
    assert separated.epsilon_lb == pytest.approx(epsilon_lower_bound(100, 100, 0, 100, 0.0))
    # Indistinguishable scores: the best threshold of one half does not carry over.
    same = [split_epsilon_bound(rng.normal(size=400), rng.normal(size=400), 1e-5, rng)
            for _ in range(20)]
    assert np.mean([b.epsilon_lb == 0.0 for b in same]) >= 0.8


def test_an_attack_that_cannot_tell_scores_auc_one_half() -> None:
    result = score_attack(np.zeros(50), np.zeros(50), delta=1e-5, seed=0)
    assert result.auc == 0.5 and result.bound.epsilon_lb == 0.0


def test_the_largest_attainable_bound_is_a_perfect_attacks_and_grows_with_the_records() -> None:
    assert epsilon_lb_max(100, 100, 0.0) == pytest.approx(3.28135, abs=1e-4)
    assert epsilon_lb_max(10, 10, 0.0) == pytest.approx(0.80715, abs=1e-4)
    for members, nonmembers in ((10, 10), (25, 40), (100, 100)):
        best = epsilon_lb_max(members, nonmembers, 1e-5)
        assert best == epsilon_lower_bound(members, members, 0, nonmembers, 1e-5)
        # no count of flagged members and non-members does better
        tp, fp = np.meshgrid(np.arange(members + 1), np.arange(nonmembers + 1))
        assert epsilon_lower_bound(tp, members, fp, nonmembers, 1e-5).max() == pytest.approx(best)
    sizes = [5, 10, 25, 50, 100, 500]
    bounds = [epsilon_lb_max(n, n, 1e-5) for n in sizes]
    assert bounds[0] == 0.0 and bool(np.all(np.diff(bounds) > 0))
    # a perfectly separating attack reaches it on the half it is counted on
    result = score_attack(np.linspace(1, 2, 200), np.linspace(-2, -1, 200), delta=1e-5, seed=0)
    assert result.bound.epsilon_lb == result.epsilon_lb_max == epsilon_lb_max(100, 100, 1e-5)
    # one that cannot tell does not, and says how far it could have gone
    blind = score_attack(np.zeros(50), np.zeros(50), delta=1e-5, seed=0)
    assert blind.bound.epsilon_lb == 0.0 < blind.epsilon_lb_max == epsilon_lb_max(25, 25, 1e-5)


# ---------------------------------------------------------------------------- held-out records


def test_holdout_overlaps_no_clients_records_and_follows_each_clients_labels() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, size=12000)
    parts = partition(labels, 4, "class_skew", 500, rng, p_major=0.8)
    held = holdout_indices(labels, parts, 300, rng)
    trained = np.concatenate(parts)
    for k, records in enumerate(held):
        assert len(records) == 300 and len(np.unique(records)) == 300
        assert not np.intersect1d(records, trained).size
        assert np.mean(labels[records] == k) == pytest.approx(np.mean(labels[parts[k]] == k),
                                                              abs=0.01)
    assert len(np.unique(np.concatenate(held))) == 4 * 300


def test_holding_records_out_trains_on_the_same_images(tmp_path) -> None:
    root = write_synthetic_digits(tmp_path / "digits")
    plain = config_from_dict(small_config(root, tmp_path / "a"))
    held = config_from_dict(small_config(root, tmp_path / "b", **{"audit.holdout": 20}))
    for a, b in zip(load_image_clients(plain, range(4)).values(),
                    load_image_clients(held, range(4)).values(), strict=True):
        assert all(x.equal(y) for x, y in zip(a.train.tensors, b.train.tensors, strict=True))
        assert a.audit_records is None and set(b.audit_records) == {"holdout"}


@pytest.mark.parametrize(("key", "value"), [("holdout", 10), ("canaries", 10),
                                            ("shadow_of", "runs/target")])
def test_slide_runs_refuse_records_set_aside(tmp_path, key, value) -> None:
    config = slide_config(tmp_path, tmp_path / "out", ["h_a"], **{f"audit.{key}": value})
    with pytest.raises(ConfigError, match=f"audit.{key} applies to image data"):
        config_from_dict(config)


def test_canaries_are_mislabelled_and_half_of_them_trained_on(tmp_path) -> None:
    root = write_synthetic_digits(tmp_path / "digits", train_per_class=200)
    plain = load_image_clients(config_from_dict(small_config(root, tmp_path / "a")), range(4))
    config = config_from_dict(small_config(root, tmp_path / "b", **{"audit.holdout": 20,
                                                                    "audit.canaries": 10}))
    clients = load_image_clients(config, range(4))
    images = load_images("mnist", root, train=True)
    seen = [np.concatenate([c.audit_records["holdout"]["member"][0] for c in clients.values()])]
    for k, client in clients.items():
        canaries = client.audit_records["canary"]
        members, wrong = canaries["member"]
        assert len(members) == len(canaries["nonmember"][0]) == 10
        for indices, labels in canaries.values():
            assert not (images.labels[indices] == labels).any()
            seen.append(indices)
        seen.append(client.audit_records["holdout"]["nonmember"][0])
        # The shard as before, then the member canaries with their wrong labels.
        shard = plain[k].train.tensors
        assert client.train.tensors[0][:len(shard[0])].equal(shard[0])
        assert client.train.tensors[1].tolist() == shard[1].tolist() + wrong.tolist()
    everything = np.concatenate(seen)
    assert len(np.unique(everything)) == len(everything)


# ---------------------------------------------------------------------------- audited runs

# Pixel noise this large leaves the classes barely learnable: what a model gets right on its
# training images it mostly memorised.
MEMORISE = {"algorithm": "regular", "clients": 2, "rounds": 30, "data.partition": "iid",
            "data.samples_per_client": 100, "audit.holdout": 100, "optim.batch_size": 25,
            "dp.enabled": False, "checkpoint_every": 0}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_synthetic_digits(tmp_path_factory.mktemp("digits"), train_per_class=60,
                                  noise=200.0)


def _audited(digits: Path, out: Path, **overrides) -> tuple[list[dict], Path]:
    run_federation(config_from_dict(small_config(digits, out, **{**MEMORISE, **overrides})))
    assert main(["audit", str(out)]) == 0
    with open(out / "audit.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == COLUMNS
        return list(reader), out


def test_a_memorising_model_leaks_and_the_members_are_its_training_images(digits, tmp_path
                                                                          ) -> None:
    rows, out = _audited(digits, tmp_path / "run")
    assert [(r["hospital"], r["model"], r["dp"]) for r in rows] == [
        ("client_0", "private", "False"), ("client_1", "private", "False")]
    for row in rows:
        assert float(row["auc"]) > 0.75
        assert float(row["epsilon_lb"]) > 0.5
        assert math.isinf(float(row["epsilon"])) and row["guarantee"] == "not private"
        assert (row["members"], row["nonmembers"]) == ("100", "100")
    records = [read_audit_records(out / "hospitals" / f"client_{k}" / "audit_records.csv")
               for k in range(2)]
    config = config_from_dict(small_config(digits, out, **MEMORISE))
    for k, client in load_image_clients(config, range(2)).items():
        members, labels = records[k]["holdout"]["member"]
        assert client.train.tensors[1].numpy().tolist() == labels.tolist()
        assert np.array_equal(members, client.audit_records["holdout"]["member"][0])
    every_member = np.concatenate([r["holdout"]["member"][0] for r in records])
    every_nonmember = np.concatenate([r["holdout"]["nonmember"][0] for r in records])
    assert not np.intersect1d(every_member, every_nonmember).size
    document = json.loads((out / "audit.json").read_text())
    assert document["results"][0]["epsilon"] is None  # infinite: no DP
    assert document["time"]["audit_s"] > 0 and document["time"]["run_wall_s"] > 0
    assert set(document["roc"]) == {"client_0/private/holdout", "client_1/private/holdout"}
    assert (out / "audit_roc.png").stat().st_size > 0
    assert (out / "hospitals" / "client_0" / "audit.csv").is_file()


def test_canaries_expose_a_memorising_model_more_than_its_other_records(digits, tmp_path
                                                                        ) -> None:
    rows, _ = _audited(digits, tmp_path / "run", **{"audit.canaries": 50})
    by_set = {(r["hospital"], r["records"]): float(r["auc"]) for r in rows}
    for hospital in ("client_0", "client_1"):
        assert by_set[hospital, "canary"] > 0.9
        assert by_set[hospital, "canary"] > by_set[hospital, "holdout"]


def test_a_model_trained_with_large_noise_stays_below_its_accountant_epsilon(digits, tmp_path,
                                                                             capsys) -> None:
    rows, _ = _audited(digits, tmp_path / "run", algorithm="regular_dp",
                       **{"dp.enabled": True, "dp.noise_multiplier": 30.0})
    printed = [line for line in capsys.readouterr().out.splitlines() if "epsilon_lb" in line]
    assert len(printed) == len(rows)
    assert all(f"of at most {float(row['epsilon_lb_max']):.2f} with these records" in line
               for row, line in zip(rows, printed, strict=True))
    for row in rows:
        assert row["dp"] == "True"
        assert row["guarantee"] == "(ε, δ)-DP per record, replace-one"
        assert abs(float(row["auc"]) - 0.5) < 0.1
        assert float(row["epsilon_lb"]) < float(row["epsilon"])
        # 50 members and 50 non-members in the counted half: the most any attack could show
        assert float(row["epsilon_lb_max"]) == pytest.approx(epsilon_lb_max(50, 50,
                                                                            float(row["delta"])))


def test_an_image_run_without_holdout_cannot_be_audited(digits, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    run_federation(config_from_dict(small_config(digits, out, **{**MEMORISE, "rounds": 1,
                                                                 "audit.holdout": 0})))
    assert main(["audit", str(out)]) != 0
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "client_0/audit_records.csv: not found" in error and "audit.holdout" in error
    assert main(["audit", str(tmp_path / "nowhere")]) != 0
    assert "not a run directory" in capsys.readouterr().err


def test_a_slide_run_audits_its_training_against_its_test_slides(tmp_path) -> None:
    hospitals = write_cohort(tmp_path / "cohort", {"h_a": 8, "h_b": 8})
    out = tmp_path / "run"
    run_federation(config_from_dict(slide_config(
        tmp_path / "cohort", out, hospitals, rounds=2, **{"slides.patches_per_slide": 1})))
    rows = audit_run(out)
    assert sorted({(r["hospital"], r["model"]) for r in rows}) == [
        (h, m) for h in hospitals for m in ("private", "proxy")]
    for row in rows:
        with open(out / "hospitals" / row["hospital"] / "splits.csv", newline="") as handle:
            splits = [r["split"] for r in csv.DictReader(handle)]
        assert row["unit"] == "slide"
        assert (row["members"], row["nonmembers"]) == (splits.count("train"),
                                                       splits.count("test"))
        assert row["shared"] == (row["model"] == "proxy") and row["dp"] == row["shared"]
        assert 0 <= row["auc"] <= 1 and row["epsilon_lb"] >= 0
    assert (out / "audit_roc.png").is_file()


# ---------------------------------------------------------------------------- LiRA


def test_lira_score_is_the_gaussian_likelihood_ratio_with_pooled_variances() -> None:
    rng = np.random.default_rng(0)
    trained = rng.random((6, 40)) < 0.5
    shadows = np.where(trained, 3.0, 0.0) + rng.normal(size=(6, 40))
    target = rng.normal(size=40) + np.r_[np.full(20, 3.0), np.zeros(20)]
    scores = lira_scores(target, shadows, trained)
    # Record 0 by hand: its own means, one variance per side over every record.
    mean_in = np.array([shadows[trained[:, j], j].mean() for j in range(40)])
    mean_out = np.array([shadows[~trained[:, j], j].mean() for j in range(40)])
    var_in = np.var((shadows - mean_in)[trained])
    var_out = np.var((shadows - mean_out)[~trained])
    expected = (norm.logpdf(target[0], mean_in[0], np.sqrt(var_in))
                - norm.logpdf(target[0], mean_out[0], np.sqrt(var_out)))
    assert scores[0] == pytest.approx(expected)
    assert scores[:20].mean() > 0 > scores[20:].mean()


def test_logit_confidence_is_the_log_odds_of_the_true_class() -> None:
    torch.manual_seed(0)
    module = torch.nn.Linear(5, 3)
    inputs, labels = torch.randn(10, 5), torch.randint(0, 3, (10,))
    p = torch.softmax(module(inputs).double(), 1)[torch.arange(10), labels].detach().numpy()
    phi = logit_confidence(module, TensorDataset(inputs, labels))
    assert phi == pytest.approx(np.log(p / (1 - p)))


def test_lira_shadows_draw_from_the_holdout_and_canaries_and_find_the_memorised_members(
        digits, tmp_path) -> None:
    out = tmp_path / "run"
    run_federation(config_from_dict(small_config(digits, out, **{**MEMORISE,
                                                                 "audit.canaries": 20})))
    assert main(["audit", str(out), "--attack", "lira", "--shadows", "3"]) == 0
    with open(out / "audit.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["hospital"], r["records"]) for r in rows) == [
        (f"client_{k}", s) for k in range(2) for s in ("canary", "holdout")]
    for row in rows:
        assert row["attack"] == "lira"
        assert float(row["auc"]) > 0.75
    for s in range(3):
        for k in range(2):
            name = f"client_{k}"
            target = read_audit_records(out / "hospitals" / name / "audit_records.csv")
            shadow = read_audit_records(out / "audit_shadows" / f"shadow_{s}" / "hospitals"
                                        / name / "audit_records.csv")
            for kind, trained in (("holdout", 100), ("canary", 20)):
                pool = {(int(r), int(y)) for m in ("member", "nonmember")
                        for r, y in zip(*target[kind][m], strict=True)}
                drawn = {(int(r), int(y)) for m in ("member", "nonmember")
                         for r, y in zip(*shadow[kind][m], strict=True)}
                assert drawn == pool and len(shadow[kind]["member"][0]) == trained
    document = json.loads((out / "audit.json").read_text())
    assert document["attack"] == "lira" and document["time"]["shadow_runs_s"] > 0
    # The shadows are runs, but not runs that a report of the directory compares.
    assert [run.directory for run in read_runs(tmp_path)] == [out]


def test_lira_needs_held_out_records(digits, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    run_federation(config_from_dict(small_config(digits, out, **{**MEMORISE, "rounds": 1,
                                                                 "audit.holdout": 0,
                                                                 "audit.canaries": 5})))
    assert main(["audit", str(out), "--attack", "lira"]) != 0
    assert "LiRA needs an image run with audit.holdout > 0" in capsys.readouterr().err

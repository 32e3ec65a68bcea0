"""The benchmarks that write the docs' tables from files: the guarantee-cost comparison over
seeds, and the demo's results table."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from benchmarks import demo_table, guarantee_cost
from federation import run_files
from federation.evaluation.compare import compare_runs


def _evaluated_run(directory: Path, seed: int, noise: float) -> Path:
    """A run that ``slidefed evaluate`` finished: test predictions of a private model and a
    proxy at two hospitals (the same slides whatever ``noise``), and its slide metrics."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    with open(directory / run_files.SLIDE_PREDICTIONS, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(run_files.PREDICTION_COLUMNS)
        for hospital in ("a", "b"):
            for k in range(20):
                label = k % 2
                latent = 1.5 * label + np.random.default_rng(k).normal()
                for model in ("private", "proxy"):
                    score = 1 / (1 + math.exp(-(latent + noise * rng.normal())))
                    writer.writerow([hospital, f"{hospital}{k}", "test", label, score,
                                     int(score >= 0.5), model])
    (directory / run_files.SLIDE_METRICS).write_text("{}")
    return directory


def test_guarantee_cost_compares_the_variants_per_seed_and_over_seeds(tmp_path) -> None:
    out = tmp_path / "cost"
    for seed in (0, 1, 2):  # finished runs are reused: nothing trains here
        _evaluated_run(out / "beta_0.0" / f"seed_{seed}", seed, noise=0.3)
        _evaluated_run(out / "beta_0.5" / f"seed_{seed}", 10 + seed, noise=1.5)
    result = guarantee_cost.measure(Path("unused.yaml"), [0, 1, 2], out, [])
    for model in ("private", "proxy"):
        deltas = []
        for row in result["models"][model]:
            seed = row["seed"]
            expected = compare_runs(out / "beta_0.0" / f"seed_{seed}",
                                    out / "beta_0.5" / f"seed_{seed}", model)["overall"]["auc"]
            assert row["delta"] == pytest.approx(expected["delta"])
            assert row["p"] == pytest.approx(expected["p"])
            deltas.append(row["delta"])
        over = result["over_seeds"][model]
        assert over["mean"] == pytest.approx(statistics.fmean(deltas))
        assert over["p"] == pytest.approx(stats.ttest_1samp(deltas, 0.0).pvalue)
    text = guarantee_cost.table(result)
    assert text.count("\n") == 1 + 2 * 4 and "(t over seeds)" in text


def test_the_demo_table_is_written_from_the_run_files(tmp_path) -> None:
    run = tmp_path / "federation" / "proxyfl"
    run.mkdir(parents=True)
    interval = {"value": 0.9, "low": 0.8, "high": 0.95}
    metrics = {model: {"pooled": {"auc": interval, "balanced_accuracy": {"value": 0.85}},
                       "hospitals": {h: {"auc": {"value": v}} for h, v in (("h_a", 1.0),
                                                                           ("h_b", 0.75))}}
               for model in ("private", "proxy")}
    (run / run_files.SLIDE_METRICS).write_text(json.dumps(metrics))
    with open(run / run_files.PRIVACY, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(run_files.PRIVACY_COLUMNS)
        for round_, eps in ((1, (1.0, 2.0)), (2, (3.25, 4.5))):
            for client, e in enumerate(eps):
                writer.writerow([round_, client, e, 1e-5, "slide", "active", "substitution",
                                 "theorem"])
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "federate_proxyfl.tsv").write_text("s\th:m:s\n104.6\t0:01:44\n")
    text = demo_table.table(tmp_path)
    assert ("| proxyfl | proxy | 0.900 [0.800, 0.950] | 0.850 | 1.00 / 0.75 | 3.2 / 4.5 |"
            in text)  # the final round's ε, per hospital
    assert "| proxyfl | private | 0.900 [0.800, 0.950] | 0.850 | 1.00 / 0.75 | — (never " in text
    assert "(ε, δ)-DP per slide, replace-one, δ = 1e-05" in text
    assert "federate_proxyfl 105 s" in text


def test_guarantee_cost_on_images_pairs_each_clients_accuracy(tmp_path, monkeypatch) -> None:
    accuracies = {0.0: {0: [0.9, 0.8, 0.7], 1: [0.95, 0.85, 0.75]},
                  0.5: {0: [0.8, 0.8, 0.8], 1: [0.90, 0.90, 0.70]}}
    for beta, by_seed in accuracies.items():
        for seed, per_client in by_seed.items():
            run = tmp_path / f"beta_{beta}" / "proxyfl" / f"seed_{seed}"
            run.mkdir(parents=True)
            (run / "summary.json").write_text(json.dumps(
                {"final": {"private": {"accuracy": {"per_client": per_client}}}}))
    planned = []
    monkeypatch.setattr("benchmarks.algorithms.run_benchmark",  # the runs are finished here
                        lambda config, algorithms, seeds, out, overrides: planned.append(
                            (algorithms, seeds, out.name, overrides)))
    result = guarantee_cost.measure_images(Path("c.yaml"), [0, 1], tmp_path, ["threads=1"])
    assert planned == [(["proxyfl"], [0, 1], "beta_0.0", ["threads=1", "dml.beta=0.0"]),
                       (["proxyfl"], [0, 1], "beta_0.5", ["threads=1", "dml.beta=0.5"])]
    rows = result["models"]["private"]
    assert [r["delta"] for r in rows] == pytest.approx([0.0, 0.0166667], abs=1e-6)
    assert [(r["clients_better"], r["clients"]) for r in rows] == [(1, 3), (2, 3)]
    assert result["over_seeds"]["private"]["mean"] == pytest.approx(0.0083333, abs=1e-6)
    assert "clients better" in guarantee_cost.table(result)

"""The benchmark runner: algorithms x seeds on the tiny synthetic digits, the report it writes,
skipping finished runs, resuming from a checkpoint, and failures that do not stop the rest."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml
from federation_synthetic import small_config, write_synthetic_digits

from benchmarks import algorithms as runner
from benchmarks.algorithms import BenchmarkError, default_ranks, run_benchmark
from federation.config import ConfigError
from slidefed.cli import main


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_synthetic_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture
def config_path(digits: Path, tmp_path: Path) -> Path:
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(small_config(digits, tmp_path / "unused")))
    return path


def _refuse_to_run(run, resume) -> None:
    pytest.fail(f"{run.name} ran again")


def test_runs_every_algorithm_and_seed_then_skips_or_resumes_them(
    config_path: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "bench"
    dirs = run_benchmark(config_path, ["proxyfl", "regular"], [0, 1], out,
                         overrides=["rounds=2"])
    assert dirs == [out / a / f"seed_{s}" for a in ("proxyfl", "regular") for s in (0, 1)]
    summaries = {}
    for directory in dirs:
        config = yaml.safe_load((directory / "config.yaml").read_text())
        assert (config["algorithm"], f"seed_{config['seed']}", config["rounds"]) == (
            directory.parent.name, directory.name, 2)
        summaries[directory] = json.loads((directory / "summary.json").read_text())
    # The seed reaches the run: the two seeds of an algorithm learn different models.
    assert ((out / "regular/seed_0/metrics.csv").read_text()
            != (out / "regular/seed_1/metrics.csv").read_text())

    with open(out / "results.csv", newline="") as handle:
        table = {row["algorithm"]: row for row in csv.DictReader(handle)}
    assert sorted(table) == ["proxyfl", "regular"]
    for algorithm, row in table.items():
        # The loop's own summary of each run, averaged over seeds, must match the report.
        finals = [summaries[out / algorithm / f"seed_{s}"] for s in (0, 1)]
        model = finals[0]["reported_model"]
        seed_means = [s["final"][model]["accuracy"]["mean"] for s in finals]
        assert (row["model"], row["seeds"], row["rounds"]) == (model, "2", "2")
        assert float(row["accuracy_mean"]) == pytest.approx(statistics.fmean(seed_means))
        assert float(row["accuracy_std"]) == pytest.approx(statistics.stdev(seed_means))
    assert float(table["proxyfl"]["epsilon_max"]) == pytest.approx(
        max(s["epsilon"]["max"] for d, s in summaries.items() if d.parent.name == "proxyfl"))
    assert table["regular"]["epsilon_max"] == ""
    assert {"results.md", "accuracy.png", "epsilon.png"} <= {p.name for p in out.iterdir()}

    # Again: every run is finished, nothing runs, the report is written anew.
    (out / "results.csv").unlink()
    with monkeypatch.context() as patch:
        patch.setitem(runner.EXECUTORS, "local", _refuse_to_run)
        assert run_benchmark(config_path, ["proxyfl", "regular"], [0, 1], out,
                             overrides=["rounds=2"]) == dirs
    assert (out / "results.csv").is_file()

    # A run without summary.json but with a checkpoint continues from it, not from round 1.
    metrics = (out / "regular/seed_1/metrics.csv").read_text()
    (out / "regular/seed_1/summary.json").unlink()
    run_benchmark(config_path, ["proxyfl", "regular"], [0, 1], out, overrides=["rounds=2"])
    resumed = json.loads((out / "regular/seed_1/summary.json").read_text())
    assert resumed["resumed_from_round"] == 2
    assert (out / "regular/seed_1/metrics.csv").read_text() == metrics


def test_joint_is_planned_without_dp_beside_the_dp_algorithms(config_path: Path,
                                                               tmp_path: Path) -> None:
    plan = runner.plan_runs(config_path, ["joint", "proxyfl"], [0], tmp_path, "local")
    assert [(run.config.algorithm, run.config.dp.enabled) for run in plan] == [
        ("joint", False), ("proxyfl", True)]


def test_a_failed_run_does_not_stop_the_others_and_is_named(
    config_path: Path, tmp_path: Path, monkeypatch
) -> None:
    attempted = []

    def fail_fedavg_seed_1(run, resume) -> None:
        attempted.append((run.name, resume, run.config.rounds))
        if run.name == "fedavg/seed_1":
            raise OSError("disk full\nsecond line")

    monkeypatch.setitem(runner.EXECUTORS, "local", fail_fedavg_seed_1)
    with pytest.raises(BenchmarkError) as raised:
        run_benchmark(config_path, ["fedavg", "cwt"], [0, 1], tmp_path / "out",
                      overrides=["rounds=7"])
    assert attempted == [(f"{a}/seed_{s}", False, 7) for a in ("fedavg", "cwt") for s in (0, 1)]
    # one line, by the rule every error follows (formats.errors.one_line)
    assert str(raised.value).startswith("1 of 4 runs failed: fedavg/seed_1 (disk full second line)")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(("algorithms", "seeds", "overrides", "error", "message"), [
    (["proxyfl", "fedprox"], [0], [], ConfigError, "unknown name 'fedprox'"),
    (["proxyfl"], [0], ["seed=3"], BenchmarkError, "the benchmark sets seed itself"),
    (["proxyfl"], [0], ["dp.noise=2"], ConfigError, "unknown key 'dp.noise'"),
    (["proxyfl"], [0, 1, 0], [], BenchmarkError, "seed 0 given more than once"),
    ([], [0], [], BenchmarkError, "no algorithm to run"),
])
def test_a_bad_plan_fails_before_anything_runs(
    config_path: Path, tmp_path: Path, monkeypatch, algorithms, seeds, overrides, error, message
) -> None:
    monkeypatch.setitem(runner.EXECUTORS, "local", _refuse_to_run)
    with pytest.raises(error, match=message):
        run_benchmark(config_path, algorithms, seeds, tmp_path / "out", overrides=overrides)
    assert not (tmp_path / "out").exists()


def test_an_unknown_backend_and_impossible_ranks_are_refused(
    config_path: Path, tmp_path: Path
) -> None:
    with pytest.raises(BenchmarkError, match="unknown backend 'slurm'"):
        run_benchmark(config_path, ["proxyfl"], [0], tmp_path / "out", backend="slurm")
    with pytest.raises(BenchmarkError, match="--ranks 2 needs --backend mpi"):
        run_benchmark(config_path, ["proxyfl"], [0], tmp_path / "out", ranks=2)
    with pytest.raises(BenchmarkError, match="--ranks 9: each run needs 1 to 4 ranks"):
        run_benchmark(config_path, ["proxyfl"], [0], tmp_path / "out", backend="mpi", ranks=9)


@pytest.mark.slow
@pytest.mark.mpi
def test_mpi_runs_match_local_runs(config_path: Path, tmp_path: Path) -> None:
    # Without DP: the runner's plumbing is what is compared here; runs with DP draw secret
    # noise, and tests/federation/test_federate_mpi.py compares them given fixed test secrets.
    for backend in ("mpi", "local"):
        run_benchmark(config_path, ["proxyfl"], [0], tmp_path / backend, backend=backend,
                      overrides=["rounds=2", "dp.enabled=false"])
    mpi, local = tmp_path / "mpi" / "proxyfl" / "seed_0", tmp_path / "local" / "proxyfl" / "seed_0"
    # The 4 clients packed on one rank per core.
    assert f"mpiexec -n {default_ranks(4)} " in (mpi / "federate.log").read_text()
    for name in ("metrics.csv", "privacy.csv"):
        assert (mpi / name).read_text() == (local / name).read_text()


def test_command_line_runs_the_benchmark_and_the_report(
    config_path: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "cli"
    assert main(["-q", "bench", "algorithms", "--config", str(config_path), "--algorithms",
                 "regular", "--seeds", "0,1", "--set", "rounds=1", "-o", str(out)]) == 0
    assert "| regular | private |" in capsys.readouterr().out
    assert main(["-q", "report", str(out), "-o", str(tmp_path / "again")]) == 0
    assert ((tmp_path / "again" / "results.md").read_text()
            == (out / "results.md").read_text())
    capsys.readouterr()
    assert main(["-q", "report", str(tmp_path / "nothing")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'nothing'}: no such directory\n"


def test_the_launchers_options_name_the_benchmarks_models() -> None:
    # benchmarks.options is torch-free so the slidefed parser imports no benchmark; its copy
    # of the comm benchmark's models must stay the models that benchmark builds.
    from benchmarks.comm import BENCH_MODELS
    from benchmarks.options import COMM_MODELS

    assert set(COMM_MODELS) == set(BENCH_MODELS)

"""The benchmark report: table numbers, curves and plots from run directories written here with
known values, and one-line errors for missing or garbled files."""

from __future__ import annotations

import csv
import json
import logging
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from benchmarks.table import (
    NON_PRIVATE,
    NOT_SHARED,
    ReportError,
    curves,
    read_runs,
    write_report,
)

ROUNDS = 4
CLIENTS = 3
DELTA = 1e-5
# algorithm -> (models it holds, the model it is judged on, trains with DP)
ALGORITHMS = {
    "proxyfl": (("private", "proxy"), "private", True),
    "fedavg": (("shared",), "shared", True),
    "regular": (("private",), "private", False),
}
# and one that runs only without DP, not in every benchmark written here
KNOWN = {**ALGORITHMS, "joint": (("shared",), "shared", False)}
TAB10 = {"C0": (31, 119, 180), "C1": (255, 127, 14), "C2": (44, 160, 44)}



def _guarantee(algorithm: str) -> str:
    """FML's runs here distil from a non-DP model (dml.beta > 0): their ε is the steps' only."""
    return "DP-SGD steps only, not a guarantee" if algorithm == "fml" else "theorem"

def _write_run(directory: Path, algorithm: str, seed: int, **config_changes) -> dict:
    """A finished run with random accuracies and ε; returns the values written:
    {"accuracy": {model: [round][client]}, "epsilon": [round][client] or None}."""
    models, reported, dp = KNOWN[algorithm]
    rng = np.random.default_rng([seed, list(KNOWN).index(algorithm)])
    directory.mkdir(parents=True)
    accuracy = {m: rng.uniform(0.2, 0.95, size=(ROUNDS, CLIENTS)).round(4) for m in models}
    with open(directory / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["round", "client", "model", "split", "metric", "value"])
        for t in range(ROUNDS):
            for c in range(CLIENTS):
                for m in models:
                    writer.writerow([t + 1, c, m, "test", "accuracy", accuracy[m][t, c]])
                    writer.writerow([t + 1, c, m, "test", "loss", 1 - accuracy[m][t, c]])
                    writer.writerow([t + 1, c, m, "train", "loss", 0.5])
    epsilon = np.cumsum(rng.uniform(0.5, 1.5, size=(ROUNDS, CLIENTS)), axis=0) if dp else None
    with open(directory / "privacy.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["round", "client", "epsilon", "delta", "unit", "relation", "guarantee"])
        if dp:
            writer.writerows([t + 1, c, epsilon[t, c], DELTA, "record", "substitution",
                              _guarantee(algorithm)]
                             for t in range(ROUNDS) for c in range(CLIENTS))
    config = {"algorithm": algorithm, "rounds": ROUNDS, "seed": seed, "clients": CLIENTS,
              "backend": "local", "output_dir": str(directory),
              "data": {"name": "fashion_mnist", "root": "/data", "p_major": 0.8},
              "dp": {"enabled": algorithm != "joint", "noise_multiplier": 1.0}}
    for dotted, value in config_changes.items():
        *parents, last = dotted.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[last] = value
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    (directory / "summary.json").write_text(json.dumps({"algorithm": algorithm,
                                                        "reported_model": reported}))
    return {"accuracy": accuracy, "epsilon": epsilon}


def _write_benchmark(root: Path, algorithms=tuple(ALGORITHMS), seeds=(0, 1)) -> dict:
    return {(a, s): _write_run(root / a / f"seed_{s}", a, s) for a in algorithms for s in seeds}


def _read_table(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["algorithm"]: row for row in csv.DictReader(handle)}


def test_table_has_mean_and_std_over_seeds_of_the_reported_models_final_accuracy(
    tmp_path: Path,
) -> None:
    written = _write_benchmark(tmp_path)
    files = write_report(tmp_path, tmp_path / "report")
    assert {p.name for p in files} == {"results.csv", "results.md", "accuracy.png",
                                       "epsilon.png"}
    table = _read_table(tmp_path / "report" / "results.csv")
    assert sorted(table) == sorted(ALGORITHMS)
    markdown = (tmp_path / "report" / "results.md").read_text()
    for algorithm, (_, reported, dp) in ALGORITHMS.items():
        row = table[algorithm]
        finals = [list(written[algorithm, s]["accuracy"][reported][-1]) for s in (0, 1)]
        seed_means = [statistics.fmean(f) for f in finals]
        assert row["model"] == reported
        assert float(row["accuracy_mean"]) == pytest.approx(statistics.fmean(seed_means))
        assert float(row["accuracy_std"]) == pytest.approx(statistics.stdev(seed_means))
        assert float(row["client_std"]) == pytest.approx(
            statistics.fmean(statistics.pstdev(f) for f in finals))
        assert (row["seeds"], row["rounds"]) == ("2", str(ROUNDS))
        md_row = next(line for line in markdown.splitlines()
                      if line.startswith(f"| {algorithm} |"))
        assert (f"{statistics.fmean(seed_means):.3f} ± {statistics.stdev(seed_means):.3f}"
                in md_row)
        if dp:
            last_eps = [list(written[algorithm, s]["epsilon"][-1]) for s in (0, 1)]
            assert float(row["epsilon_mean"]) == pytest.approx(
                statistics.fmean(statistics.fmean(e) for e in last_eps))
            assert float(row["epsilon_max"]) == pytest.approx(max(max(e) for e in last_eps))
            assert float(row["delta"]) == DELTA
            # what the ε is, beside it
            statement = ("DP-SGD steps only, not a guarantee" if _guarantee(algorithm) != "theorem"
                         else "(ε, δ)-DP per record, replace-one")
            assert row["statement"] == statement and f"| {statement} |" in md_row
        else:
            assert row["epsilon_mean"] == row["epsilon_max"] == row["delta"] == ""
            assert md_row.count("—") == 4


def test_curves_average_clients_then_seeds_at_every_round(tmp_path: Path) -> None:
    written = _write_benchmark(tmp_path)
    runs = read_runs(tmp_path)
    accuracy = {c.algorithm: c for c in curves(runs, "accuracy")}
    assert sorted(accuracy) == sorted(ALGORITHMS)
    for algorithm, (_, reported, _) in ALGORITHMS.items():
        curve = accuracy[algorithm]
        assert curve.label == f"{algorithm} ({reported})"
        assert list(curve.rounds) == list(range(1, ROUNDS + 1))
        for i in range(ROUNDS):
            per_seed = [statistics.fmean(written[algorithm, s]["accuracy"][reported][i])
                        for s in (0, 1)]
            assert curve.mean[i] == pytest.approx(statistics.fmean(per_seed))
            assert curve.std[i] == pytest.approx(statistics.stdev(per_seed))
    epsilon = {c.algorithm: c for c in curves(runs, "epsilon")}
    assert sorted(epsilon) == ["fedavg", "proxyfl"]  # regular trains without DP
    assert epsilon["proxyfl"].label == "proxyfl"  # ε is the proxy's, not the private model's
    per_seed = [statistics.fmean(written["fedavg", s]["epsilon"][1]) for s in (0, 1)]
    assert epsilon["fedavg"].mean[1] == pytest.approx(statistics.fmean(per_seed))


def _pixels_of(image: np.ndarray, rgb: tuple[int, int, int]) -> int:
    return int(np.all(image[..., :3] == rgb, axis=-1).sum())


def test_plots_are_pngs_with_a_line_per_algorithm(tmp_path: Path) -> None:
    _write_benchmark(tmp_path)
    write_report(tmp_path)
    # Algorithms sorted by name take tab10 colours C0, C1, C2: fedavg, proxyfl, regular.
    expected = {"accuracy.png": {"C0", "C1", "C2"}, "epsilon.png": {"C0", "C1"}}
    for name, colours in expected.items():
        path = tmp_path / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as png:
            png.verify()
        with Image.open(path) as png:
            image = np.asarray(png.convert("RGB"))
        assert image.shape[0] > 300 and image.shape[1] > 500
        for colour, rgb in TAB10.items():
            drawn = _pixels_of(image, rgb)
            assert (drawn > 50) == (colour in colours), f"{name}: {drawn} pixels of {colour}"


def test_runs_without_dp_give_no_epsilon_plot_and_one_seed_no_std(tmp_path: Path) -> None:
    _write_benchmark(tmp_path, algorithms=("regular",), seeds=(3,))
    files = write_report(tmp_path)
    assert {p.name for p in files} == {"results.csv", "results.md", "accuracy.png"}
    assert not (tmp_path / "epsilon.png").exists()
    row = _read_table(tmp_path / "results.csv")["regular"]
    assert row["accuracy_std"] == "" and row["seeds"] == "1"
    assert "±" not in (tmp_path / "results.md").read_text().split("\n\n")[0]


def test_an_unfinished_run_is_left_out_with_a_warning(tmp_path: Path, caplog) -> None:
    _write_benchmark(tmp_path)
    unfinished = tmp_path / "fedavg" / "seed_1"
    (unfinished / "summary.json").unlink()
    with caplog.at_level(logging.WARNING, logger="benchmarks.table"):
        write_report(tmp_path)
    assert str(unfinished) in caplog.text
    table = _read_table(tmp_path / "results.csv")
    assert (table["fedavg"]["seeds"], table["proxyfl"]["seeds"]) == ("1", "2")


def _truncate_row(path: Path) -> None:
    lines = path.read_text().splitlines()
    lines[3] = ",".join(lines[3].split(",")[:3])  # drop delta and what follows it
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(("file", "damage", "problem"), [
    ("metrics.csv", lambda p: p.unlink(), "missing"),
    ("metrics.csv", lambda p: p.write_text(p.read_text().replace("train,loss,0.5",
                                                                  "train,loss,half", 1)),
     "'half' is not a number"),
    ("metrics.csv", lambda p: p.write_text("round,client,value\n1,0,0.5\n"),
     "lacks column(s) model, split, metric"),
    ("privacy.csv", _truncate_row, "None is not a number"),
    ("privacy.csv", lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), "not a readable CSV"),
    ("summary.json", lambda p: p.write_text('{"reported_model": "private"'), "not valid JSON"),
    ("summary.json", lambda p: p.write_text("{}"), "has no 'reported_model'"),
    ("summary.json", lambda p: p.write_text('{"reported_model": "teacher"}'),
     "reported_model 'teacher' is none of the engine's models"),
    ("config.yaml", lambda p: p.write_text("algorithm: [proxyfl\n"), "line 2 expected ','"),
    ("config.yaml", lambda p: p.write_text("- proxyfl\n"), "expected a mapping of keys"),
    ("config.yaml", lambda p: p.write_text("algorithm: teleport\n"),
     "algorithm = 'teleport': unknown name"),
])
def test_a_missing_or_garbled_file_is_a_one_line_error_naming_it(
    tmp_path: Path, file: str, damage, problem: str
) -> None:
    _write_benchmark(tmp_path, algorithms=("proxyfl",))
    run = tmp_path / "proxyfl" / "seed_1"
    damage(run / file)
    with pytest.raises(ReportError) as raised:
        write_report(tmp_path)
    message = str(raised.value)
    assert message.startswith(str(run / file))
    assert problem in message
    assert "\n" not in message


def test_runs_of_different_settings_or_the_same_seed_twice_are_refused(tmp_path: Path) -> None:
    _write_run(tmp_path / "a" / "seed_0", "proxyfl", 0)
    _write_run(tmp_path / "b" / "seed_0", "regular", 0, **{"dp.noise_multiplier": 1.4,
                                                           "data.root": "/elsewhere"})
    with pytest.raises(ReportError, match=r"dp.noise_multiplier = 1.4 .* has 1.0; report runs"):
        read_runs(tmp_path)

    _write_run(tmp_path / "c" / "again", "proxyfl", 0, output_dir="/moved")
    (tmp_path / "b" / "seed_0" / "config.yaml").unlink()  # b is out of the way now
    with pytest.raises(ReportError, match="both proxyfl with seed 0; keep one"):
        read_runs(tmp_path)


def test_a_directory_without_finished_runs_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no such directory"):
        write_report(tmp_path / "absent")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("algorithm: proxyfl\n")
    with pytest.raises(ReportError, match="holds no finished run"):
        write_report(tmp_path)


def test_joint_without_dp_is_reported_beside_dp_runs_but_dp_must_agree(tmp_path: Path) -> None:
    # The benchmark runs joint with dp.enabled = false (it cannot train with DP).
    _write_benchmark(tmp_path, algorithms=("proxyfl",))
    _write_run(tmp_path / "joint" / "seed_0", "joint", 0)
    assert sorted({run.algorithm for run in read_runs(tmp_path)}) == ["joint", "proxyfl"]
    _write_run(tmp_path / "other" / "seed_5", "proxyfl", 5, **{"dp.enabled": False})
    with pytest.raises(ReportError, match=r"has dp.enabled = True but .*other/seed_5 has False"):
        read_runs(tmp_path)


def test_runs_whose_hospitals_kept_their_accuracy_say_not_shared(tmp_path: Path) -> None:
    _write_benchmark(tmp_path, algorithms=("proxyfl", "fedavg"))
    for seed in (0, 1):  # fedavg's hospitals shared nothing (report.shared_metrics: [])
        path = tmp_path / "fedavg" / f"seed_{seed}" / "metrics.csv"
        path.write_text(path.read_text().splitlines()[0] + "\n")
    files = write_report(tmp_path, tmp_path / "report")
    assert {p.name for p in files} == {"results.csv", "results.md", "accuracy.png",
                                       "epsilon.png"}
    table = _read_table(tmp_path / "report" / "results.csv")
    assert table["fedavg"]["accuracy_mean"] == "" and table["proxyfl"]["accuracy_mean"] != ""
    markdown = (tmp_path / "report" / "results.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| fedavg"))
    assert row.split(" | ")[2:4] == [NOT_SHARED, NOT_SHARED]
    assert "Accuracy (non-private)" in markdown and NON_PRIVATE in markdown
    for seed in (0, 1):
        path = tmp_path / "proxyfl" / f"seed_{seed}" / "metrics.csv"
        path.write_text(path.read_text().splitlines()[0] + "\n")
    files = write_report(tmp_path, tmp_path / "none")
    assert {p.name for p in files} == {"results.csv", "results.md", "epsilon.png"}

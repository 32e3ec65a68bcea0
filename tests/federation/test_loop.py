"""The round loop's outputs, checkpoints and resume, and ``slidefed federate`` on one process."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from federation_synthetic import run_killed_in_round, small_config, write_synthetic_digits

from federation.algorithms import ALGORITHMS
from federation.config import ConfigError, config_from_dict, load_config
from federation.loop import configure_threads, resolve_backend, run_federation
from federation.privacy.randomness import fixed_secrets_for_tests
from federation.run_directory import RunDirectory, StartFacts, agree_on_start
from federation.run_files import METRICS_COLUMNS, PRIVACY_COLUMNS
from federation.transport.comm import LocalCommunicator
from slidefed.cli import main


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_synthetic_digits(tmp_path_factory.mktemp("digits"))


def _config(digits: Path, out: Path, **overrides):
    return config_from_dict(small_config(digits, out, **overrides))


def _checkpoint_files(run_dir: Path) -> list[str]:
    """The checkpoint files of every hospital of the run in ``run_dir``, by hospital."""
    return [p.name for p in sorted(run_dir.glob("hospitals/*/checkpoints/round_*.pt"))]


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def test_outputs_have_the_promised_files_and_columns(digits: Path, tmp_path: Path) -> None:
    config = _config(digits, tmp_path, rounds=4, eval_every=3)
    summary = run_federation(config)

    columns, metrics = _read(tmp_path / "metrics.csv")
    assert tuple(columns) == METRICS_COLUMNS == ("round", "client", "model", "split", "metric",
                                                 "value")
    # Rounds 3 (eval_every) and 4 (the last) are evaluated; every client, both models.
    assert sorted({int(r["round"]) for r in metrics}) == [3, 4]
    keys = {(r["round"], r["client"], r["model"], r["split"], r["metric"]) for r in metrics}
    assert len(keys) == len(metrics)
    # The coordinator's file holds what the hospitals share (report.shared_metrics: held-out
    # accuracy); each hospital's own holds every row of its models, training losses included.
    assert keys == {(str(t), str(c), m, "test", "accuracy") for t in (3, 4) for c in range(4)
                    for m in ("private", "proxy")}
    assert all(0 <= float(r["value"]) <= 1 for r in metrics if r["metric"] == "accuracy")
    for c in range(4):
        columns, own = _read(tmp_path / "hospitals" / f"client_{c}" / "metrics.csv")
        assert tuple(columns) == METRICS_COLUMNS
        assert {(r["round"], r["model"], r["split"], r["metric"]) for r in own} == {
            (str(t), m, s, k) for t in (3, 4) for m in ("private", "proxy")
            for s, k in (("test", "accuracy"), ("test", "loss"), ("train", "loss"))}
        shared = [r for r in metrics if r["client"] == str(c)]
        assert shared == [r for r in own if r["split"] == "test" and r["metric"] == "accuracy"]
        assert _read(tmp_path / "hospitals" / f"client_{c}" / "privacy.csv")[1] == [
            r for r in _read(tmp_path / "privacy.csv")[1] if r["client"] == str(c)]

    columns, privacy = _read(tmp_path / "privacy.csv")
    assert tuple(columns) == PRIVACY_COLUMNS == ("round", "client", "epsilon", "delta", "unit",
                                                 "status", "relation", "guarantee")
    assert {r["unit"] for r in privacy} == {"record"}  # an image is one record
    # The default proxy learns from its own labels only: its ε is a theorem, replace-one.
    assert {(r["relation"], r["guarantee"]) for r in privacy} == {("substitution", "theorem")}
    assert {r["status"] for r in privacy} == {"active"}  # no budget: never stopped
    assert len(privacy) == config.rounds * config.clients  # every round, not only evaluated ones
    for c in range(config.clients):
        epsilons = [float(r["epsilon"]) for r in privacy if r["client"] == str(c)]
        assert all(a < b for a, b in zip(epsilons, epsilons[1:], strict=False))
        assert epsilons[0] > 0
    assert {float(r["delta"]) for r in privacy} == {1e-3}

    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["rounds"] == 4
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    final_private = [float(r["value"]) for r in metrics
                     if r["round"] == "4" and r["model"] == "private"
                     and r["metric"] == "accuracy"]
    assert summary["final"]["private"]["accuracy"]["per_client"] == final_private
    assert summary["final"]["private"]["accuracy"]["mean"] == pytest.approx(
        sum(final_private) / 4)
    assert summary["epsilon"]["per_client"] == [
        float(r["epsilon"]) for r in privacy if r["round"] == "4"]
    assert summary["reported_model"] == "private"
    times = summary["time"]
    assert {"wall_s", "training_s", "communication_s", "accounting_s"} <= times.keys()
    assert times["wall_s"] >= times["training_s"] > 0
    for c in range(4):  # each hospital's checkpoint in its own directory
        checkpoints = tmp_path / "hospitals" / f"client_{c}" / "checkpoints"
        assert sorted(p.name for p in checkpoints.iterdir()) == ["round_000004.pt",
                                                                  "run_config.yaml"]
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("overrides", [{"algorithm": "regular"}, {"dp.enabled": False}])
def test_privacy_csv_lists_only_dp_trained_models(digits: Path, tmp_path: Path, overrides) -> None:
    summary = run_federation(_config(digits, tmp_path, rounds=2, **overrides))
    columns, privacy = _read(tmp_path / "privacy.csv")
    assert tuple(columns) == PRIVACY_COLUMNS and privacy == []
    assert summary["epsilon"] is None


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_resume_after_a_kill_gives_the_uninterrupted_files(
    digits: Path, tmp_path: Path, monkeypatch, algorithm: str
) -> None:
    overrides = {"algorithm": algorithm, "rounds": 4, "checkpoint_every": 2,
                 "fedavg.client_fraction": 0.5}
    whole = _config(digits, tmp_path / "whole", **overrides)
    broken = _config(digits, tmp_path / "broken", **overrides)
    with fixed_secrets_for_tests(0):  # both runs hold the same hospital secrets
        run_federation(whole)
        run_killed_in_round(broken, monkeypatch)  # in round 4; the checkpoint is of round 2
    _, rows = _read(tmp_path / "broken" / "hospitals" / "client_0" / "metrics.csv")
    assert max(int(r["round"]) for r in rows) == 3
    assert _checkpoint_files(tmp_path / "broken") == ["round_000002.pt"] * whole.clients

    # The resumed processes draw fresh keys, then read each hospital's secret stream back
    # from its own checkpoint: its noise continues exactly.
    summary = run_federation(broken, resume=True)
    for name in ("metrics.csv", "privacy.csv", *(f"hospitals/client_{c}/{f}" for c in range(4)
                                                 for f in ("metrics.csv", "privacy.csv"))):
        assert (tmp_path / "broken" / name).read_text() == (tmp_path / "whole" / name).read_text()
    assert summary["resumed_from_round"] == 2
    whole_summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["final"] == whole_summary["final"]
    assert summary["epsilon"] == whole_summary["epsilon"]
    # Rounds 1-2 count too. Joint's set-up agrees on the steps per epoch in one allreduce of
    # a K-vector per client, which the resumed run really sends again.
    repeated = whole.clients**2 if algorithm == "joint" else 0
    assert summary["elements_sent"] == whole_summary["elements_sent"] + repeated
    assert _checkpoint_files(tmp_path / "broken") == ["round_000004.pt"] * whole.clients


def test_a_run_killed_while_hospitals_checkpoint_resumes_from_the_round_they_all_hold(
    digits: Path, tmp_path: Path, monkeypatch
) -> None:
    overrides = {"rounds": 4, "checkpoint_every": 2}
    with fixed_secrets_for_tests(0):
        run_federation(_config(digits, tmp_path / "whole", **overrides))
    real_save = RunDirectory.save_client

    def killed_at_client_2(self, round, name, state):
        if round == 4 and name == "client_2":
            raise KeyboardInterrupt
        real_save(self, round, name, state)

    monkeypatch.setattr(RunDirectory, "save_client", killed_at_client_2)
    broken = _config(digits, tmp_path / "broken", **overrides)
    with pytest.raises(KeyboardInterrupt), fixed_secrets_for_tests(0):
        run_federation(broken)
    monkeypatch.undo()
    assert _checkpoint_files(tmp_path / "broken") == [
        "round_000002.pt", "round_000004.pt", "round_000002.pt", "round_000004.pt",
        "round_000002.pt", "round_000002.pt"]  # clients 0 and 1 wrote round 4, 2 and 3 not
    assert run_federation(broken, resume=True)["resumed_from_round"] == 2
    for name in ("metrics.csv", "privacy.csv", "hospitals/client_3/metrics.csv"):
        assert (tmp_path / "broken" / name).read_text() == (tmp_path / "whole" / name).read_text()
    assert _checkpoint_files(tmp_path / "broken") == ["round_000004.pt"] * 4


def test_a_hospital_that_lost_its_checkpoint_stops_the_resume_in_one_line(
    digits: Path, tmp_path: Path
) -> None:
    run_federation(_config(digits, tmp_path, rounds=2))
    (tmp_path / "hospitals/client_1/checkpoints/round_000002.pt").unlink()  # another disk
    metrics = (tmp_path / "metrics.csv").read_text()
    with pytest.raises(ConfigError, match=(
            r"^--resume: the hospitals hold checkpoints of no common round \(client_0: 2; "
            r"client_1: none; client_2: 2; client_3: 2\); every hospital must resume from the "
            r"same round: restore")):
        run_federation(_config(digits, tmp_path, rounds=3), resume=True)
    assert (tmp_path / "metrics.csv").read_text() == metrics  # nothing was touched


def _facts(rounds: tuple[int, ...], config_hash: str = "same", differences: tuple = (),
           finished: str | None = None) -> StartFacts:
    return StartFacts(config_hash, rounds, differences, finished)


def test_processes_agree_on_where_to_start_or_all_refuse_alike() -> None:
    names = ["a", "b", "c"]
    agree = functools.partial(agree_on_start, names=names, rounds=10)
    assert agree([_facts(())] * 3, resume=False, force=False) == 0
    assert agree([_facts(())] * 3, resume=True, force=False) == 0  # nothing to resume
    # a checkpoint being committed when the run stopped: the last round all of them hold
    assert agree([_facts((4, 6)), _facts((4,)), _facts((4, 6))], resume=True, force=False) == 4
    with pytest.raises(ConfigError, match=r"^--resume: the hospitals hold checkpoints of no "
                                          r"common round \(a: 6; b: 4; c: 6\)"):
        agree([_facts((6,)), _facts((4,)), _facts((6,))], resume=True, force=False)
    with pytest.raises(ConfigError, match=r"^the process of hospital c runs another "
                                          r"configuration than that of a \(fingerprint x vs "
                                          r"same\); every process must run the same one, apart "
                                          r"from backend, data.root, device, output_dir, "
                                          r"slides.workers$"):
        agree([_facts(()), _facts(()), _facts((), "x")], resume=False, force=False)
    with pytest.raises(ConfigError, match=r"^--resume: the configuration differs from the one "
                                          r"hospital b's checkpoints were written under: seed "
                                          r"\(0 -> 1\)$"):
        agree([_facts((4,)), _facts((4,), differences=("seed (0 -> 1)",)), _facts((4,))],
              resume=True, force=False)
    with pytest.raises(ConfigError, match=r"^hospital b holds a checkpointed run"):
        agree([_facts(()), _facts((4,)), _facts(())], resume=False, force=False)
    assert agree([_facts(()), _facts((4,)), _facts(())], resume=False, force=True) == 0
    with pytest.raises(ConfigError, match=r"^/runs/x holds the results of a finished run"):
        agree([_facts((), finished="/runs/x"), _facts(()), _facts(())], resume=True,
              force=False)
    with pytest.raises(ConfigError, match=r"^--resume: the run is checkpointed at round 12, "
                                          r"past rounds = 10$"):
        agree([_facts((12,))] * 3, resume=True, force=False)


def test_resume_extends_a_finished_run(digits: Path, tmp_path: Path) -> None:
    with fixed_secrets_for_tests(0):
        run_federation(_config(digits, tmp_path / "short", rounds=2))
        run_federation(_config(digits, tmp_path / "long", rounds=4))
    summary = run_federation(_config(digits, tmp_path / "short", rounds=4), resume=True)
    for name in ("metrics.csv", "privacy.csv"):
        assert (tmp_path / "short" / name).read_text() == (tmp_path / "long" / name).read_text()
    assert summary["rounds"] == 4


def test_resume_adds_the_status_column_to_an_older_privacy_csv(digits: Path,
                                                                tmp_path: Path) -> None:
    run_federation(_config(digits, tmp_path, rounds=2))
    _, rows = _read(tmp_path / "privacy.csv")
    old_columns = [c for c in PRIVACY_COLUMNS if c != "status"]  # as versions before wrote it
    with open(tmp_path / "privacy.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, old_columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    run_federation(_config(digits, tmp_path, rounds=3), resume=True)
    columns, resumed = _read(tmp_path / "privacy.csv")
    assert tuple(columns) == PRIVACY_COLUMNS
    assert [r["status"] for r in resumed] == [""] * 8 + ["active"] * 4
    assert [r["epsilon"] for r in resumed[:8]] == [r["epsilon"] for r in rows]


def test_a_checkpointed_run_is_not_overwritten_or_resumed_with_other_settings(
    digits: Path, tmp_path: Path
) -> None:
    run_federation(_config(digits, tmp_path, rounds=2))
    with pytest.raises(ConfigError, match=r"^hospital client_0 holds a checkpointed run "
                                          r"\(hospitals/client_0/checkpoints\); pass --resume"):
        run_federation(_config(digits, tmp_path, rounds=2))
    with pytest.raises(ConfigError, match=r"differs .*: dp.noise_multiplier \(1.0 -> 1.5\)"):
        run_federation(_config(digits, tmp_path, rounds=3, **{"dp.noise_multiplier": 1.5}),
                       resume=True)


def test_finished_results_are_not_overwritten_without_force(digits: Path,
                                                             tmp_path: Path) -> None:
    run_federation(_config(digits, tmp_path, rounds=1))
    for checkpoints in (tmp_path / "hospitals").glob("*/checkpoints"):
        shutil.rmtree(checkpoints)  # what is left: a finished run's results
    finished = (tmp_path / "metrics.csv").read_text()
    with pytest.raises(ConfigError, match="holds the results of a finished run .*--force"):
        run_federation(_config(digits, tmp_path, rounds=1, seed=1))
    assert (tmp_path / "metrics.csv").read_text() == finished
    summary = run_federation(_config(digits, tmp_path, rounds=1, seed=1), force=True)
    assert summary["seed"] == 1 and (tmp_path / "metrics.csv").read_text() != finished
    # --force also replaces a checkpointed run, whose old checkpoints must not survive it
    run_federation(_config(digits, tmp_path, rounds=2, checkpoint_every=1), force=True)
    run_federation(_config(digits, tmp_path, rounds=1, checkpoint_every=0), force=True)
    assert _checkpoint_files(tmp_path) == ["round_000001.pt"] * 4


@pytest.mark.parametrize("where, message", [
    ("a_file", r"output_dir .*a_file: is a file, not a directory$"),
    ("a_file/run", r"output_dir .*a_file/run: cannot write there \(Not a directory\)$"),
])
def test_an_unusable_output_dir_fails_before_the_data_loads(tmp_path: Path, where: str,
                                                            message: str) -> None:
    (tmp_path / "a_file").write_text("not a directory")
    config = _config(tmp_path / "no_data_here", tmp_path / where)
    with pytest.raises(ConfigError, match=message):
        run_federation(config)


def test_an_unknown_timm_model_fails_before_the_data_loads(tmp_path: Path) -> None:
    config = _config(tmp_path / "no_data_here", tmp_path / "run",
                     **{"model.proxy": "timm:no_such_net"})
    with pytest.raises(ConfigError, match=r"^model.proxy = 'timm:no_such_net': timm has no "
                                          r"model 'no_such_net'"):
        run_federation(config)


def test_resume_without_a_checkpoint_starts_afresh(digits: Path, tmp_path: Path) -> None:
    summary = run_federation(_config(digits, tmp_path, rounds=1), resume=True)
    assert summary["resumed_from_round"] is None and summary["rounds"] == 1


def test_backend_auto_picks_mpi_only_under_a_launcher(monkeypatch) -> None:
    for variable in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        monkeypatch.delenv(variable, raising=False)
    assert resolve_backend("auto") == "local"
    monkeypatch.setenv("PMI_RANK", "0")
    assert resolve_backend("auto") == "mpi"
    assert resolve_backend("local") == "local"


@pytest.mark.parametrize("variable", ["PMI_SIZE", "OMPI_COMM_WORLD_SIZE"])
def test_a_local_backend_is_refused_inside_an_mpi_launch_of_several(monkeypatch,
                                                                     variable: str) -> None:
    monkeypatch.setenv(variable, "1")
    assert resolve_backend("local") == "local"  # one process: one federation
    monkeypatch.setenv(variable, "2")
    with pytest.raises(ConfigError, match="^backend local under an MPI launch of 2 processes "
                                          "would run 2 whole federations into one output_dir"):
        resolve_backend("local")
    assert resolve_backend("mpi") == "mpi"


def test_backend_auto_is_refused_when_srun_started_tasks_that_are_not_mpi_ranks(
        monkeypatch) -> None:
    for variable in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_SIZE",
                     "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "3")  # a batch script's one process: one federation
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    assert resolve_backend("auto") == "local"
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "3")  # srun -n 3 without --mpi=pmi2
    with pytest.raises(ConfigError, match=r"^the launcher started 3 processes but none is an "
                                          r"MPI rank, .* \(mpiexec -n R with R <= K, or under "
                                          r"SLURM srun --mpi=pmi2 -n R\), or one process$"):
        resolve_backend("auto")
    monkeypatch.setenv("PMI_RANK", "0")  # srun --mpi=pmi2 gives each task a rank
    assert resolve_backend("auto") == "mpi"


def test_the_default_thread_count_is_the_same_on_both_backends(monkeypatch) -> None:
    set_to: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("MPI_LOCALNRANKS", "4")
    local = LocalCommunicator(4)
    rank = SimpleNamespace(owned=[1], size=4, processes=4)  # one of four ranks under mpiexec
    config = config_from_dict({"clients": 4})
    assert configure_threads(config, local) == configure_threads(config, rank) == 1
    cores = dataclasses.replace(config, threads=None)  # the cores, shared among the processes
    assert (configure_threads(cores, local), configure_threads(cores, rank)) == (8, 2)
    # Without the launcher's count of ranks on this node: the ranks, not the clients.
    monkeypatch.delenv("MPI_LOCALNRANKS")
    packed = SimpleNamespace(owned=[2, 3], size=4, processes=2)
    assert configure_threads(cores, packed) == 4
    assert set_to == [1, 1, 8, 2, 4]


def test_slidefed_federate_runs_the_demo_config(digits: Path, tmp_path: Path, capsys) -> None:
    demo = Path(__file__).resolve().parents[2] / "configs" / "federation_demo.yaml"
    out = tmp_path / "run"
    code = main(["-q", "federate", "--config", str(demo), "--backend", "local",
                 "--set", f"output_dir={out}", "--set", "data.name=mnist",
                 "--set", f"data.root={digits}", "--set", "data.samples_per_client=60",
                 "--set", "data.test_samples_per_client=50", "--set", "optim.batch_size=20",
                 "--set", "rounds=2", "--set", "threads=1"])
    assert code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("proxyfl: 2 rounds, 4 clients, private accuracy ")
    assert line.endswith(f"-> {out}")
    saved = load_config(out / "config.yaml")
    assert saved.backend == "local" and saved.data.root == str(digits) and saved.rounds == 2
    assert main(["-q", "federate", "--config", str(out / "config.yaml")]) == 1
    assert "pass --resume" in capsys.readouterr().err
    assert main(["-q", "federate", "--config", str(out / "config.yaml"), "--force"]) == 0
    with pytest.raises(SystemExit):  # two ways of treating an earlier run: choose one
        main(["-q", "federate", "--config", str(out / "config.yaml"), "--force", "--resume"])
    assert "not allowed with argument" in capsys.readouterr().err

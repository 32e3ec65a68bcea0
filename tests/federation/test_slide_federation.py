"""Slide-level federation end to end on the tiny bag cohort: every algorithm, then
``evaluate_run``; the privacy unit; resume; and the same files under ``mpiexec``.

DP runs take ``slides.patches_per_slide: 1``: ``PrivateTraining.backward`` does not yet clip a
slide's several patches as one record (it raises NotImplementedError).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from federation_synthetic import run_killed_in_round
from mpi_launch import REPO, run_mpiexec
from slide_bags import slide_config

from federation import catalog
from federation.algorithms import ALGORITHMS
from federation.config import config_from_dict
from federation.data.bags import BagReader
from federation.evaluation.metrics import METRICS, choose_threshold
from federation.evaluation.run import (
    CROSS_SITE_COLUMNS,
    PREDICTION_COLUMNS,
    _Scorer,
    evaluate_run,
    hospital_slides,
    open_run,
    saved_models,
)
from federation.loop import run_federation
from federation.model_files import decision_path
from federation.privacy.randomness import fixed_secrets_for_tests
from federation.run_files import PRIVACY_COLUMNS

FAST = {"rounds": 2, "slides.patches_per_slide": 1}

FIXED_SECRETS = REPO / "tests" / "mpi_scripts" / "federate_with_fixed_secrets.py"


def _config(bag_cohort, out: Path, **overrides):
    root, hospitals = bag_cohort
    return config_from_dict(slide_config(root, out, hospitals, **{**FAST, **overrides}))


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_trains_on_bags_and_its_run_evaluates(bag_cohort, tmp_path,
                                                             algorithm) -> None:
    _, hospitals = bag_cohort
    run_federation(_config(bag_cohort, tmp_path, algorithm=algorithm,
                           **{"fedavg.client_fraction": 0.5}))
    result = evaluate_run(tmp_path, n_bootstrap=50, progress=False)

    models, private = {}, set()  # name -> shared, and the DP-trained, from the model files
    splits = {}
    for hospital in hospitals:
        directory = tmp_path / "hospitals" / hospital
        _, rows = _read(directory / "splits.csv")
        splits[hospital] = {r["slide_id"]: r["split"] for r in rows}
        for path in sorted((directory / "models").glob("*.pt")):
            card = torch.load(path, weights_only=True)
            assert (card["hospital"], card["data"]["patch_size"]) == (hospital, 32)
            # no threshold or slide head chosen on its slides: those are the hospital's
            # private decision card, beside the file
            assert card["decision"] == {} and decision_path(path).is_file()
            models[card["model"]] = card["shared"]
            if card["privacy"]["dp"]:
                private.add(card["model"])
        columns, predictions = _read(directory / "slide_predictions.csv")
        assert tuple(columns) == PREDICTION_COLUMNS
        assert {r["hospital"] for r in predictions} == {hospital}
        assert json.loads((directory / "slide_metrics.json").read_text()).keys() == models.keys()
    assert models

    columns, predictions = _read(tmp_path / "slide_predictions.csv")
    assert tuple(columns) == PREDICTION_COLUMNS == (
        "hospital", "slide_id", "split", "label", "score", "prediction", "model")
    for model in models:
        for hospital in hospitals:
            rows = [r for r in predictions if r["model"] == model and r["hospital"] == hospital]
            held_out = {s: split for s, split in splits[hospital].items() if split != "train"}
            assert {r["slide_id"]: r["split"] for r in rows} == held_out
            assert len(rows) == len(held_out) == 4  # only validation and test slides
    assert all(0 <= float(r["score"]) <= 1 and r["prediction"] in ("0", "1")
               for r in predictions)

    on_disk = json.loads((tmp_path / "slide_metrics.json").read_text())
    assert on_disk.keys() == result.keys() == models.keys()
    for summary in on_disk.values():
        assert summary.keys() == {"hospitals", "pooled"}
        assert summary["hospitals"].keys() == set(hospitals)
        assert summary["pooled"]["slides"] == 2 * len(hospitals)  # every hospital's test slides
        for metrics in (*summary["hospitals"].values(), summary["pooled"]):
            for metric in METRICS:
                assert metrics[metric].keys() == {"value", "low", "high"}

    columns, cross_site = _read(tmp_path / "cross_site.csv")
    assert tuple(columns) == CROSS_SITE_COLUMNS
    shared = sorted(name for name, is_shared in models.items() if is_shared)
    assert sorted({r["model"] for r in cross_site}) == shared
    assert len(cross_site) == len(shared) * len(hospitals) ** 2

    columns, privacy = _read(tmp_path / "privacy.csv")
    assert tuple(columns) == PRIVACY_COLUMNS
    assert {r["unit"] for r in privacy} == ({"slide"} if private else set())

    # The coordinator has the validation AUC and accuracy (report.shared_metrics); each
    # hospital keeps every row, named as report.shared_metrics can choose them.
    _, shared = _read(tmp_path / "metrics.csv")
    assert {(r["split"], r["metric"]) for r in shared} == {("validation", "auc"),
                                                           ("validation", "accuracy")}
    for hospital in hospitals:
        _, own = _read(tmp_path / "hospitals" / hospital / "metrics.csv")
        assert {r["model"] for r in own} <= set(catalog.MODEL_NAMES)
        assert {r["split"] for r in own} <= set(catalog.SPLITS)
        assert {r["metric"] for r in own} == {"auc", "accuracy", "loss"} <= set(
            catalog.ROUND_METRICS)
    assert bool(private) == (algorithm not in ("regular", "joint"))  # no DP model


def test_cross_site_chooses_the_threshold_at_the_testing_hospital(bag_cohort, tmp_path
                                                                 ) -> None:
    _, hospitals = bag_cohort
    run_federation(_config(bag_cohort, tmp_path, rounds=1))
    config, run, chosen = open_run(tmp_path, None)
    scorer = _Scorer(BagReader(), config)
    home, away = hospitals[0], hospitals[1]
    proxy = next(m for m in saved_models(run, home) if m.name == "proxy")
    foreign = dataclasses.replace(proxy, threshold=2.0)  # a home threshold no score reaches
    slides = hospital_slides(config, run, away)
    _, threshold, _ = scorer.away(foreign, away, slides)
    validation = slides["validation"]
    assert threshold == choose_threshold([b.label for b in validation],
                                         [scorer.score(proxy, b) for b in validation]) != 2.0
    assert scorer.away(foreign, home, hospital_slides(config, run, home))[1] == 2.0


def test_patch_level_dp_is_labelled_patch(bag_cohort, tmp_path) -> None:
    run_federation(_config(bag_cohort, tmp_path, **{"slides.privacy_unit": "patch"}))
    _, privacy = _read(tmp_path / "privacy.csv")
    assert privacy and {r["unit"] for r in privacy} == {"patch"}
    card = torch.load(tmp_path / "hospitals" / "h_a" / "models" / "proxy.pt", weights_only=True)
    assert card["privacy"]["unit"] == card["data"]["privacy_unit"] == "patch"


def test_a_killed_slide_run_resumes_to_the_uninterrupted_files(bag_cohort, tmp_path,
                                                              monkeypatch) -> None:
    overrides = {"rounds": 4, "checkpoint_every": 2}
    broken = _config(bag_cohort, tmp_path / "broken", **overrides)
    with fixed_secrets_for_tests(0):  # the same hospital secrets in both runs
        run_federation(_config(bag_cohort, tmp_path / "whole", **overrides))
        run_killed_in_round(broken, monkeypatch)  # in round 4; the checkpoint is of round 2
    assert [p.name for p in (tmp_path / "broken/hospitals/h_b/checkpoints").glob("round_*")
            ] == ["round_000002.pt"]
    summary = run_federation(broken, resume=True)
    assert summary["resumed_from_round"] == 2
    for name in ("metrics.csv", "privacy.csv", "hospitals/h_b/splits.csv",
                 "hospitals/h_b/metrics.csv"):
        assert (tmp_path / "broken" / name).read_text() == (tmp_path / "whole" / name).read_text()


@pytest.mark.slow
@pytest.mark.mpi
def test_three_ranks_under_mpiexec_write_the_local_backends_files(bag_cohort, tmp_path) -> None:
    root, hospitals = bag_cohort
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(slide_config(root, tmp_path / "unused", hospitals, **FAST)))
    result, _ = run_mpiexec(3, str(FIXED_SECRETS), "-q", "federate", "--config", str(path),
                            "--backend", "mpi", "--set", f"output_dir={tmp_path / 'mpi'}")
    assert result.returncode == 0, result.stderr[-3000:]
    with fixed_secrets_for_tests(0):  # the secrets the MPI ranks held
        run_federation(_config(bag_cohort, tmp_path / "local"))
    for name in ("metrics.csv", "privacy.csv"):
        assert (tmp_path / "mpi" / name).read_text() == (tmp_path / "local" / name).read_text()
    for hospital in hospitals:
        for name in (f"hospitals/{hospital}/splits.csv", f"hospitals/{hospital}/metrics.csv"):
            assert (tmp_path / "mpi" / name).read_text() == (tmp_path / "local" / name
                                                             ).read_text()

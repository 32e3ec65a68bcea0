"""Slide-level metrics, thresholds, scoring and model files, on inputs whose answers we know."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, recall_score, roc_auc_score
from slide_bags import index_cohort
from torch import nn

from federation.data.bags import BagReader
from federation.data.patches import to_model_input
from federation.evaluation.metrics import (
    METRICS,
    _resampled_metrics,
    choose_threshold,
    metrics_with_intervals,
    point_metrics,
)
from federation.evaluation.scoring import evenly_spaced, patch_probabilities, top_k_score
from federation.model_files import (
    FORMAT_VERSION,
    ModelFileError,
    decision_path,
    decision_threshold,
    load_model,
    read_decision,
    read_model_file,
    save_decision,
    save_model,
)
from federation.models import create_model

# Ties within and across labels, and a per-slide threshold for pooled hospitals.
LABELS = np.array([0, 0, 1, 1, 0, 1, 1, 0, 1, 0, 0, 1])
SCORES = np.array([0.2, 0.4, 0.4, 0.9, 0.1, 0.6, 0.4, 0.6, 0.8, 0.3, 0.2, 0.55])
PER_SLIDE = np.array([0.5, 0.3, 0.3, 0.5, 0.5, 0.7, 0.5, 0.5, 0.5, 0.3, 0.3, 0.5])


def _sklearn(labels, scores, threshold) -> dict[str, float]:
    called = (scores >= threshold).astype(int)
    return {"auc": roc_auc_score(labels, scores), "accuracy": accuracy_score(labels, called),
            "balanced_accuracy": balanced_accuracy_score(labels, called),
            "sensitivity": recall_score(labels, called, pos_label=1),
            "specificity": recall_score(labels, called, pos_label=0)}


@pytest.mark.parametrize("threshold", [0.5, 0.4, PER_SLIDE])
def test_point_metrics_are_scikit_learns(threshold) -> None:
    assert point_metrics(LABELS, SCORES, threshold) == pytest.approx(
        _sklearn(LABELS, SCORES, threshold))


def test_auc_counts_ties_as_half() -> None:
    # pairs (tumour, normal): (.2, .2) tie, (.2, .1), (.9, .2), (.9, .1): 3.5 of 4
    assert point_metrics([0, 1, 0, 1], [0.2, 0.2, 0.1, 0.9], 0.5)["auc"] == 0.875


def test_metrics_of_one_class_are_nan_where_undefined() -> None:
    metrics = point_metrics([1, 1, 1], [0.2, 0.7, 0.9], 0.5)
    assert math.isnan(metrics["auc"]) and math.isnan(metrics["balanced_accuracy"])
    assert math.isnan(metrics["specificity"])
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["sensitivity"] == 2 / 3


@pytest.mark.parametrize("threshold", [0.5, PER_SLIDE])
def test_resampled_metrics_match_point_metrics_on_every_resample(threshold) -> None:
    t = np.broadcast_to(np.asarray(threshold, float), SCORES.shape)
    picks = np.vstack([np.arange(len(LABELS)),  # the identity resample first
                       np.random.default_rng(0).integers(0, len(LABELS), (40, len(LABELS)))])
    resampled = _resampled_metrics(LABELS[picks], SCORES[picks], SCORES[picks] >= t[picks])
    for row, pick in enumerate(picks):
        expected = point_metrics(LABELS[pick], SCORES[pick], t[pick])
        got = {m: resampled[m][row] for m in METRICS}
        assert got == pytest.approx(expected, nan_ok=True), row


def _cohort(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    return labels, np.clip(0.35 + 0.3 * labels + rng.normal(0, 0.2, n), 0, 1)


def test_intervals_contain_the_value_and_shrink_with_more_slides() -> None:
    widths = {}
    for n in (20, 400):
        labels, scores = _cohort(n, seed=n)
        result = metrics_with_intervals(labels, scores, 0.5, n_bootstrap=500, seed=1)
        assert set(result) == set(METRICS)
        for metric, interval in result.items():
            assert interval["low"] <= interval["value"] <= interval["high"], (n, metric)
        widths[n] = {m: r["high"] - r["low"] for m, r in result.items()}
    assert all(widths[400][m] < widths[20][m] for m in METRICS)
    assert metrics_with_intervals(*_cohort(20, 20), 0.5, n_bootstrap=500, seed=1) == (
        metrics_with_intervals(*_cohort(20, 20), 0.5, n_bootstrap=500, seed=1))


def _youden(labels: np.ndarray, scores: np.ndarray, t: float) -> float:
    called = scores >= t
    return called[labels == 1].mean() + (~called[labels == 0]).mean() - 1


@pytest.mark.parametrize("seed", range(5))
def test_threshold_maximises_youdens_j(seed) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 30)
    labels[:2] = (0, 1)
    scores = np.round(rng.uniform(0, 1, 30) * 0.6 + 0.3 * labels, 1)  # coarse: many ties
    best = max(_youden(labels, scores, t) for t in np.unique(scores))
    chosen = choose_threshold(labels, scores)
    assert _youden(labels, scores, chosen) == pytest.approx(best)
    assert chosen in scores


def test_threshold_of_one_class_falls_back_to_one_half(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert choose_threshold([0, 0, 0], [0.1, 0.7, 0.3], what="h_a") == 0.5
    assert "h_a: validation slides hold one class only; decision threshold 0.50" in caplog.text


def test_threshold_falls_back_to_one_half_when_no_cut_beats_chance(caplog) -> None:
    with caplog.at_level(logging.WARNING):  # every tumour slide scores below every normal one
        assert choose_threshold([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9], what="h_b") == 0.5
    assert "h_b: no threshold separates the validation slides better than chance" in caplog.text


# ---------------------------------------------------------------------------- scoring


def test_top_k_score_is_the_mean_of_the_k_highest() -> None:
    probabilities = np.array([0.1, 0.9, 0.5, 0.7])
    assert top_k_score(probabilities, 2) == pytest.approx(0.8)
    assert top_k_score(probabilities, 1) == 0.9
    assert top_k_score(probabilities, 10) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="without patches"):
        top_k_score(np.zeros(0), 3)


def test_evenly_spaced_indices() -> None:
    assert evenly_spaced(10, None).tolist() == list(range(10))
    assert evenly_spaced(10, 3).tolist() == [0, 4, 9]  # linspace 0, 4.5, 9 rounded to even
    assert evenly_spaced(3, 5).tolist() == [0, 1, 2]


class _RedLogit(nn.Module):
    """Logits (0, 4·mean of the red channel): a tumour probability we can compute."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = x[:, 0].mean(dim=(1, 2))
        return torch.stack([torch.zeros_like(red), self.scale * red], dim=1)


def test_patch_probabilities_apply_the_module_to_the_normalised_patches(bag_cohort) -> None:
    root, _ = bag_cohort
    bag = index_cohort(root, "h_a")[0]
    reader = BagReader()
    module = _RedLogit().train()
    indices = np.array([9, 2, 2, 11, 0])
    red = to_model_input(reader.read(bag.path, indices))[:, 0].mean(dim=(1, 2)).double()
    expected = torch.sigmoid(4 * red).numpy()
    got = patch_probabilities(module, reader, bag, indices, batch_size=2)
    assert got.dtype == np.float64 and got == pytest.approx(expected, rel=1e-6)
    assert module.training  # the module's mode is restored
    every = patch_probabilities(module, reader, bag)
    assert len(every) == bag.n_patches and every[indices] == pytest.approx(got)


# ---------------------------------------------------------------------------- model files


def _card() -> dict:
    return {"architecture": "cnn1",
            "model_options": {"num_classes": 2, "in_channels": 3, "image_size": 32},
            "hospital": "h_a", "model": "proxy", "algorithm": "proxyfl", "round": 2, "seed": 0,
            "shared": True, "data": {"kind": "slides", "patch_size": 32},
            "decision": {"threshold": 0.4}, "privacy": {"dp": True, "epsilon": 1.5,
                                                        "delta": 1e-3, "unit": "slide"}}


def test_a_saved_model_loads_with_its_weights_and_card(tmp_path) -> None:
    module = create_model("cnn1", num_classes=2, in_channels=3, image_size=32, seed=4)
    path = tmp_path / "models" / "proxy.pt"
    save_model(path, module, **_card())
    loaded, card = load_model(path)
    assert not loaded.training
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(loaded(x), module.eval()(x))
    assert card["format_version"] == FORMAT_VERSION
    assert {k: card[k] for k in _card()} == _card()
    with pytest.raises(ValueError, match="missing privacy"):
        save_model(tmp_path / "x.pt", module, **{k: v for k, v in _card().items()
                                                if k != "privacy"})


def _truncated(path, saved):
    path.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])


def _foreign(path, saved):
    torch.save({"weights": torch.zeros(3)}, path)


def _other_version(path, saved):
    torch.save({**torch.load(saved, weights_only=True), "format_version": 99}, path)


def _wrong_shapes(path, saved):
    document = torch.load(saved, weights_only=True)
    torch.save({**document, "model_options": {**document["model_options"], "image_size": 64}},
               path)


def _stale_weights(path, saved):
    document = torch.load(saved, weights_only=True)
    weights = {**document["state_dict"], "scale": torch.ones(3)}  # as an older version saved
    del weights["3.bias"]
    torch.save({**document, "state_dict": weights, "slidefed_version": "0.0.1"}, path)


@pytest.mark.parametrize("damage, reason", [
    (_truncated, "not a readable slidefed model file ("),
    (_foreign, "not a slidefed model file"),
    (_other_version, f"model format version 99 is not {FORMAT_VERSION}"),
    (_wrong_shapes, "cannot rebuild 'cnn1' (size mismatch for "),
    (_stale_weights, "cannot rebuild 'cnn1': the saved weights do not fit this version's model "
                     "(missing 3.bias; unexpected scale); it was saved by slidefed 0.0.1"),
])
def test_unusable_model_files_are_one_line_errors_naming_the_file(tmp_path, damage,
                                                                  reason) -> None:
    saved = tmp_path / "good.pt"
    save_model(saved, create_model("cnn1", num_classes=2, in_channels=3, image_size=32),
               **_card())
    path = tmp_path / "bad.pt"
    damage(path, saved)
    with pytest.raises(ModelFileError) as error:
        load_model(path)
    assert str(error.value).startswith(f"{path}: {reason}")
    assert "\n" not in str(error.value)
    with pytest.raises(ModelFileError, match="model file not found"):
        load_model(tmp_path / "absent.pt")


def test_a_decision_card_belongs_to_the_model_file_beside_it(tmp_path) -> None:
    module = create_model("cnn1", num_classes=2, in_channels=3, image_size=32, seed=4)
    path = tmp_path / "models" / "proxy.pt"
    save_model(path, module, **{**_card(), "decision": {}})
    document = read_model_file(path)
    assert read_decision(path, document) == {}  # no card: nothing chosen here
    save_decision(path, {"threshold": 0.3}, hospital="h_a", model="proxy")
    assert read_decision(path, document) == {"threshold": 0.3}
    assert decision_threshold(path, read_decision(path, document)) == 0.3
    save_decision(path, {"threshold": 0.3}, hospital="h_b", model="proxy")
    with pytest.raises(ModelFileError, match="is the card of h_b's proxy, not of h_a's proxy"):
        read_decision(path, document)
    decision_path(path).write_bytes(b"garbage")
    with pytest.raises(ModelFileError, match="not a readable decision card"):
        read_decision(path, document)
    # a file written before the cards holds its decision itself
    assert read_decision(path, {**document, "decision": {"threshold": 0.4}}) == {
        "threshold": 0.4}

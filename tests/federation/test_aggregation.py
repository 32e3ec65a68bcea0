"""Slide aggregation: the CNN's patch features, the attention-MIL head's fit, its round trip
through a model file's card, and a slide run with ``slides.aggregation: attention_mil``."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from slide_bags import index_cohort, slide_config

from federation.config import ConfigError, config_from_dict
from federation.data.slides import CohortError, SlideClientData
from federation.evaluation.aggregation import (
    AttentionHead,
    TopK,
    aggregator_from_card,
    feature_layers,
    fit_attention_head,
)
from federation.evaluation.metrics import point_metrics
from federation.evaluation.run import evaluate_run
from federation.loop import run_federation
from federation.model_files import decision_path
from federation.models import create_model


@pytest.mark.parametrize("name", ["patch_cnn", "cnn1"])
def test_feature_layers_then_the_final_linear_layer_is_the_model(name) -> None:
    model = create_model(name, num_classes=2, in_channels=3, image_size=32, seed=0).eval()
    extractor, linear = feature_layers(model)
    x = torch.randn(5, 3, 32, 32)
    features = extractor(x)
    assert features.shape == (5, linear.in_features)
    torch.testing.assert_close(linear(features), model(x))


def test_a_model_without_a_final_linear_layer_is_refused() -> None:
    with pytest.raises(ValueError, match="final linear layer"):
        feature_layers(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1)))


def _toy_bags(rng: np.random.Generator, n: int) -> tuple[list[np.ndarray], list[int]]:
    """Bags of 6–12 noise vectors; a tumour bag hides one or two instances shifted along
    feature 0 (what top-k of a good patch classifier would also find)."""
    bags, labels = [], []
    for i in range(n):
        label = i % 2
        bag = rng.normal(size=(int(rng.integers(6, 13)), 8)).astype(np.float32)
        if label:
            bag[: int(rng.integers(1, 3)), 0] += 4.0
        bags.append(bag)
        labels.append(label)
    return bags, labels


def test_the_head_learns_which_instances_make_a_tumour_slide() -> None:
    rng = np.random.default_rng(0)
    train, train_labels = _toy_bags(rng, 40)
    test, test_labels = _toy_bags(rng, 40)
    head = fit_attention_head(train, train_labels, seed=0)
    with torch.no_grad():
        scores = [float(torch.softmax(head(torch.from_numpy(b)), 0)[1]) for b in test]
        logits, attention = head.attend(torch.from_numpy(test[1]))  # a tumour bag
    assert point_metrics(test_labels, scores, 0.5)["auc"] > 0.9
    assert int(attention.argmax()) == int(np.argmax(test[1][:, 0]))  # looks at the shifted one
    assert float(attention.sum()) == pytest.approx(1.0)


def test_the_fit_is_seeded_and_leaves_the_global_rng_alone() -> None:
    bags, labels = _toy_bags(np.random.default_rng(1), 10)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = fit_attention_head(bags, labels, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    second = fit_attention_head(bags, labels, seed=5)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_one_class_cannot_fit_a_head() -> None:
    bags, _ = _toy_bags(np.random.default_rng(2), 4)
    with pytest.raises(ValueError, match="both classes"):
        fit_attention_head(bags, [0, 0, 0, 0], seed=0)


def test_cards_rebuild_the_same_aggregator() -> None:
    bags, labels = _toy_bags(np.random.default_rng(3), 10)
    head = AttentionHead(fit_attention_head(bags, labels, seed=0))
    card = head.card()
    assert card["method"] == "attention_mil" and "without DP" in card["fitted_on"]
    rebuilt = aggregator_from_card(card)
    for a, b in zip(head.head.state_dict().values(), rebuilt.head.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert aggregator_from_card(TopK(3).card()).k == 3
    with pytest.raises(ValueError, match="unknown slide aggregation"):
        aggregator_from_card({"method": "max"})


def test_an_unknown_aggregation_is_a_config_error(bag_cohort, tmp_path) -> None:
    root, hospitals = bag_cohort
    with pytest.raises(ConfigError, match="slides.aggregation"):
        config_from_dict(slide_config(root, tmp_path, hospitals,
                                      **{"slides.aggregation": "max"}))


def test_an_attention_run_saves_home_heads_and_fits_foreign_ones(bag_cohort, tmp_path) -> None:
    root, hospitals = bag_cohort
    run_federation(config_from_dict(slide_config(
        root, tmp_path, hospitals, rounds=2, **{"slides.patches_per_slide": 1,
                                                "slides.aggregation": "attention_mil"})))
    for hospital in hospitals:
        for name in ("private", "proxy"):
            path = tmp_path / "hospitals" / hospital / "models" / f"{name}.pt"
            card = torch.load(path, weights_only=True)
            assert card["data"]["aggregation"]["method"] == "attention_mil"
            # the head and threshold, fitted on the hospital's slides without DP, are in its
            # private decision card, not in the model file (which a proxy's leaves with)
            assert card["decision"] == {}
            decision = torch.load(decision_path(path), weights_only=True)
            assert decision["aggregation"]["method"] == "attention_mil"
            assert 0.0 < decision["threshold"] <= 1.0
    result = evaluate_run(tmp_path, n_bootstrap=20, progress=False)
    assert result.keys() == {"private", "proxy"}
    with open(tmp_path / "cross_site.csv", newline="") as handle:
        cross_site = list(csv.DictReader(handle))
    assert len(cross_site) == len(hospitals) ** 2  # one proxy per hospital, on every hospital
    with open(tmp_path / "slide_predictions.csv", newline="") as handle:
        predictions = list(csv.DictReader(handle))
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in predictions)


def test_a_hospital_of_one_label_is_refused_before_training_an_attention_run(bag_cohort,
                                                                             ) -> None:
    root, hospitals = bag_cohort
    config = config_from_dict(slide_config(root, Path("unused"), hospitals,
                                           **{"slides.aggregation": "attention_mil"}))
    normal = [b for b in index_cohort(root, hospitals[0]) if b.label == 0]
    with pytest.raises(CohortError, match="attention_mil needs training slides of both"):
        SlideClientData(hospitals[0], {"train": normal, "validation": [], "test": []},
                        config.slides)
    SlideClientData(hospitals[0], {"train": normal, "validation": [], "test": []},
                    config_from_dict(slide_config(root, Path("unused"), hospitals)).slides)

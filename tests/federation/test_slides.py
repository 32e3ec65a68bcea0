"""Patch bags as client data: loading a hospital, splits, patch choice, batches, config checks."""

from __future__ import annotations

import csv
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from slide_bags import index_cohort, slide_config
from torch import nn

from federation.catalog import OPTIMIZERS
from federation.client import LocalModel, distillation_loss, train_mutual
from federation.config import ConfigError, config_from_dict
from federation.data.bags import BagFormatError
from federation.data.slides import CohortError, SlideClientData, load_hospital
from federation.data.splits import read_splits, split_slides
from federation.models import create_model

HOSPITAL = "h_a"


def _config(root: Path, tmp_path: Path, **overrides):
    return config_from_dict(slide_config(root, tmp_path / "run", [HOSPITAL], **overrides))


def _copy_hospital(bag_cohort, tmp_path: Path) -> Path:
    """A private copy of one hospital of the shared cohort, to break."""
    root, _ = bag_cohort
    shutil.copytree(root / HOSPITAL, tmp_path / "cohort" / HOSPITAL)
    return tmp_path / "cohort"


def _rewrite_manifest(directory: Path, change) -> None:
    path = directory / "manifest.csv"
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns, rows = reader.fieldnames, [change(row) for row in reader]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(r for r in rows if r is not None)


# ---------------------------------------------------------------------------- loading


def test_a_hospital_is_loaded_split_and_its_splits_written(bag_cohort, tmp_path) -> None:
    root, _ = bag_cohort
    data = load_hospital(_config(root, tmp_path), HOSPITAL)
    assert (data.name, data.unit, data.num_units) == (HOSPITAL, "slide", len(data.train))
    assert data.model_options() == {"in_channels": 3, "image_size": 32}
    # 3 slides of each label; 0.25 of 3 rounds to 1 validation and 1 test slide per label.
    assert [sorted(b.label for b in s) for s in (data.train, data.validation, data.test)] == [
        [0, 1], [0, 1], [0, 1]]
    data.write_records(tmp_path)
    recorded = read_splits(tmp_path / "splits.csv")
    expected = {b.slide_id: split for split, bags in (("train", data.train),
                ("validation", data.validation), ("test", data.test)) for b in bags}
    assert recorded == expected and len(recorded) == 6
    with (tmp_path / "splits.csv").open() as handle:
        assert {row["hospital"] for row in csv.DictReader(handle)} == {HOSPITAL}


def test_patch_unit_counts_patches(bag_cohort, tmp_path) -> None:
    root, _ = bag_cohort
    data = load_hospital(_config(root, tmp_path, **{"slides.privacy_unit": "patch"}), HOSPITAL)
    assert data.unit == "patch" and data.num_units == 12 * len(data.train)


def test_a_listed_slide_without_its_bag_is_an_error(bag_cohort, tmp_path) -> None:
    root = _copy_hospital(bag_cohort, tmp_path)
    (root / HOSPITAL / "bags" / "h_a_002.h5").unlink()
    with pytest.raises(CohortError) as error:
        load_hospital(_config(root, tmp_path), HOSPITAL)
    assert str(error.value) == (f"{root / HOSPITAL / 'manifest.csv'}: slide 'h_a_002' is listed "
                                f"as ok but its bag {root / HOSPITAL / 'bags' / 'h_a_002.h5'} "
                                "is missing")


def test_a_label_other_than_0_or_1_is_an_error(bag_cohort, tmp_path) -> None:
    root = _copy_hospital(bag_cohort, tmp_path)
    _rewrite_manifest(root / HOSPITAL, lambda r: {**r, "label": "2"} if r["slide_id"] ==
                      "h_a_001" else r)
    with pytest.raises(CohortError) as error:
        load_hospital(_config(root, tmp_path), HOSPITAL)
    assert str(error.value) == (f"{root / HOSPITAL / 'manifest.csv'}: line 3: label '2' of "
                                "slide 'h_a_001' is not 0 or 1")


def test_failed_slides_are_left_out_with_a_warning(bag_cohort, tmp_path, caplog) -> None:
    root = _copy_hospital(bag_cohort, tmp_path)
    _rewrite_manifest(root / HOSPITAL, lambda r: {**r, "status": "failed"} if r["slide_id"] ==
                      "h_a_005" else r)
    with caplog.at_level(logging.WARNING):
        data = load_hospital(_config(root, tmp_path), HOSPITAL)
    assert "1 slides failed preprocessing and are left out" in caplog.text
    assert "h_a_005" not in {b.slide_id for b in data.train + data.validation + data.test}


@pytest.mark.parametrize("setting, value, reason", [
    ("slides.patch_size", 64, "patch size 32 differs from slides.patch_size = 64"),
    ("slides.target_mpp", 0.5, "tiled at 1.0 µm/px, not at slides.target_mpp = 0.5"),
])
def test_bags_tiled_otherwise_than_the_config_are_refused(bag_cohort, tmp_path, setting, value,
                                                          reason) -> None:
    root, _ = bag_cohort
    with pytest.raises(BagFormatError) as error:
        load_hospital(_config(root, tmp_path, **{setting: value}), HOSPITAL)
    assert str(error.value) == f"{root / HOSPITAL / 'bags' / 'h_a_000.h5'}: {reason}"


@pytest.mark.parametrize("overrides, message", [
    ({"data.hospitals": []}, "data.name = bags needs data.hospitals, one name per client"),
    ({"clients": 2}, "clients = 2 but data.hospitals names 1 hospitals"),
    ({"data.hospitals": ["site/a"]}, "data.hospitals = ('site/a',): 'site/a' is not a plain "
                                     "file name"),
    ({"dp.mechanism": "ghost"}, "dp.mechanism = ghost clips each patch alone and cannot clip "
                                "a slide's patches together; use bookkeeping or hooks, or "
                                "slides.patches_per_slide = 1"),
])
def test_bag_run_configs_that_cannot_work_are_refused(tmp_path, overrides, message) -> None:
    with pytest.raises(ConfigError) as error:
        config_from_dict(slide_config(tmp_path, tmp_path / "run", ["h_a"], **overrides))
    assert str(error.value) == f"config: {message}"


# ---------------------------------------------------------------------------- splits


def test_splits_are_by_slide_stratified_and_seeded() -> None:
    ids = [f"s{i:02d}" for i in range(20)]
    labels = [1] * 8 + [0] * 12
    splits = split_slides(ids, labels, validation_fraction=0.25, test_fraction=0.25, seed=7)
    assert list(splits) == ids and set(splits.values()) == {"train", "validation", "test"}
    counts = {(split, label): 0 for split in ("train", "validation", "test") for label in (0, 1)}
    for slide_id, label in zip(ids, labels, strict=True):
        counts[splits[slide_id], label] += 1
    assert counts == {("train", 1): 4, ("validation", 1): 2, ("test", 1): 2,
                      ("train", 0): 6, ("validation", 0): 3, ("test", 0): 3}
    again = split_slides(ids, labels, validation_fraction=0.25, test_fraction=0.25, seed=7)
    other = split_slides(ids, labels, validation_fraction=0.25, test_fraction=0.25, seed=8)
    assert again == splits and other != splits


def test_half_slides_round_up_and_one_slide_of_each_label_stays_to_train() -> None:
    ids = ["t0", "t1", "n0", "n1"]
    splits = split_slides(ids, [1, 1, 0, 0], validation_fraction=0.25, test_fraction=0.25,
                          seed=0)
    for label in ("t", "n"):  # 2 x 0.25 = 0.5 rounds up: a test slide, then one to train
        assert sorted(splits[i] for i in ids if i.startswith(label)) == ["test", "train"]


def test_a_split_with_one_class_warns_and_scores_nan_auc(bag_cohort, tmp_path, caplog) -> None:
    root = _copy_hospital(bag_cohort, tmp_path)
    # 3 tumour slides and 1 normal: 0.3 validation takes one tumour slide, no normal one.
    _rewrite_manifest(root / HOSPITAL, lambda r: r if r["slide_id"] in
                      ("h_a_000", "h_a_001", "h_a_002", "h_a_004") else None)
    config = _config(root, tmp_path, **{"slides.validation_fraction": 0.3,
                                        "slides.test_fraction": 0.0})
    with caplog.at_level(logging.WARNING):
        data = load_hospital(config, HOSPITAL)
    assert (f"{HOSPITAL}: the validation split holds slides of label [1] only; its AUC is "
            "undefined and reported as nan") in caplog.text
    metrics = data.evaluate(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2)))
    assert math.isnan(metrics["auc"]) and 0 <= metrics["accuracy"] <= 1
    assert math.isfinite(metrics["loss"])


# ---------------------------------------------------------------------------- batches


def _client(bag_cohort, **settings) -> SlideClientData:
    """Every slide of the shared cohort's ``h_a`` as training slides."""
    root, _ = bag_cohort
    config = config_from_dict(slide_config(root, Path("unused"), [HOSPITAL],
                                           **{f"slides.{k}": v for k, v in settings.items()}))
    return SlideClientData(HOSPITAL, {"train": index_cohort(root, HOSPITAL), "validation": [],
                                      "test": []}, config.slides)


def _batches(data: SlideClientData, seed: int = 3) -> list:
    epoch = list(data.epoch(2, torch.Generator().manual_seed(seed)))
    sampled = list(data.sampled([[0, 3], [5], [], [1, 2, 4]], torch.Generator().manual_seed(seed)))
    return epoch + sampled


def test_batches_do_not_depend_on_the_worker_count(bag_cohort) -> None:
    here = _batches(_client(bag_cohort, workers=0, augment="hed"))
    workers = _batches(_client(bag_cohort, workers=2, augment="hed"))
    assert len(here) == len(workers) == 3 + 4
    for a, b in zip(here, workers, strict=True):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.groups, b.groups)
    assert here[-2].inputs.shape == (0, 3, 32, 32)  # the empty Poisson batch


def test_each_slide_gives_at_most_k_patches_half_of_them_tumour(bag_cohort) -> None:
    """``write_cohort``'s tumour slides (even ids) have 4 tumour patches of 12."""
    for k, tumour_rows, other_rows in ((4, 2, 2), (3, 2, 1), (20, 4, 8), (1, 1, 0)):
        data = _client(bag_cohort, patches_per_slide=k, augment="none")
        (batch,) = data.sampled([[0, 1, 2, 3, 4, 5]], torch.Generator().manual_seed(k))
        for group in range(6):
            rows = batch.groups == group
            labels = batch.labels[rows]
            tumour_slide = group % 2 == 0
            assert len(labels) == min(k, 12)
            assert int(labels.sum()) == (tumour_rows if tumour_slide else 0)
            if tumour_slide:
                assert len(labels) - int(labels.sum()) == other_rows
            # distinct patches: without augmentation equal rows would be the same patch
            assert len(torch.unique(batch.inputs[rows].flatten(1), dim=0)) == len(labels)


def test_epochs_without_dp_draw_both_slide_labels_equally_often(bag_cohort) -> None:
    root, _ = bag_cohort
    bags = index_cohort(root, HOSPITAL)
    skewed = [bags[0]] + [b for b in bags if b.label == 0]  # 1 tumour slide : 3 normal
    data = SlideClientData(HOSPITAL, {"train": skewed, "validation": [], "test": []},
                           _client(bag_cohort, patches_per_slide=1, augment="none").settings)
    generator = torch.Generator().manual_seed(0)
    tumour_share = []
    for _ in range(150):
        for batch in data.epoch(1, generator):
            tumour_share.append(int(batch.labels.max()))  # a tumour slide's row is tumour
    assert len(tumour_share) == 150 * 4
    assert 0.42 < np.mean(tumour_share) < 0.58  # uniform draws would give 0.25


def test_mutual_learning_teaches_each_model_on_its_own_batches(bag_cohort) -> None:
    root, _ = bag_cohort
    data = SlideClientData(HOSPITAL, {"train": index_cohort(root, HOSPITAL), "validation": [],
                                      "test": []},
                           _client(bag_cohort, patches_per_slide=2, augment="none").settings)
    generator = torch.Generator().manual_seed(0)
    own = list(data.epoch(2, generator))  # the private model's class-balanced batches
    poisson = list(data.sampled([[0, 1, 2], [3]], generator))  # the proxy's: one step fewer
    assert len(own) == len(poisson) + 1

    def local(name: str, seed: int, batches: list) -> LocalModel:
        module = create_model("patch_cnn", num_classes=2, in_channels=3, seed=seed)
        model = LocalModel(name, module, data, optimizer=OPTIMIZERS["sgd"], lr=0.1,
                           weight_decay=0.0, batch_size=2, seed=seed, dp=None, label=name)
        model.batches = lambda: iter(batches)
        return model

    private, proxy = local("private", 1, own), local("proxy", 2, poisson)
    losses: dict[str, list[torch.Tensor]] = {"private": [], "proxy": []}
    for model in (private, proxy):  # record the losses; no update, so models stay as they are
        model.step = lambda loss, groups=None, name=model.name: losses[name].append(
            loss.detach())
    train_mutual(private, proxy, first_weight=0.3, second_weight=0.6, epochs=1)

    def expected(student, teacher, weight, batch):
        with torch.no_grad():
            return distillation_loss(student.module(batch.inputs), batch.labels,
                                     teacher.module(batch.inputs), weight)

    assert [len(v) for v in losses.values()] == [len(own), len(poisson)]
    for loss, batch in zip(losses["private"], own, strict=True):
        torch.testing.assert_close(loss, expected(private, proxy, 0.3, batch))
    for loss, batch in zip(losses["proxy"], poisson, strict=True):
        torch.testing.assert_close(loss, expected(proxy, private, 0.6, batch))

"""``slidefed predict``: scores as evaluation gives them, heatmaps, GeoJSON regions, bad input."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import shapely
import torch
from shapely.geometry import box, shape

from benchmarks.predict import bench_predict
from federation.data.bags import BagReader, index_bag
from federation.evaluation.aggregation import AttentionHead, feature_layers, model_aggregator
from federation.evaluation.heatmap import heatmap_figure, read_patch_map
from federation.evaluation.regions import tumour_regions
from federation.evaluation.scoring import patch_probabilities
from federation.model_files import (
    ModelFileError,
    decision_path,
    load_model,
    read_decision,
    save_decision,
    save_model,
)
from federation.models import create_model
from federation.models.mil import GatedAttentionMIL
from preprocessing.options import TilingOptions
from preprocessing.tile import tile_slide
from slidefed.cli import main
from slidefed.predict import predict_slides
from wsi.synthetic import SyntheticSlideSpec, tumour_geojson, write_synthetic_slide

TARGET_MPP, PATCH = 2.0, 32  # 128 level-0 px per patch on a 0.5 µm/px slide


def _save(path, target_mpp=TARGET_MPP, aggregation=None, *, inline=False, card=True):
    """A model file as a run writes it: the decision (threshold, aggregation) in the
    hospital's decision card beside it; ``inline``: in the file, as files written before the
    cards; ``card=False``: the model file alone, as another hospital would hold a proxy."""
    module = create_model("patch_cnn_small", num_classes=2, in_channels=3, image_size=PATCH,
                          seed=3)
    decision = {"threshold": 0.5} | ({} if aggregation is None else {"aggregation": aggregation})
    save_model(path, module, architecture="patch_cnn_small",
               model_options={"num_classes": 2, "in_channels": 3, "image_size": PATCH},
               hospital="h_a", model="proxy", algorithm="proxyfl", round=1, seed=0,
               shared=True, data={"kind": "slides", "target_mpp": target_mpp,
                                  "patch_size": PATCH, "aggregation": {"k": 3}},
               decision=decision if inline else {},
               privacy={"dp": True, "epsilon": 1.0, "delta": 1e-5, "unit": "slide"})
    if card and not inline:
        save_decision(path, decision, hospital="h_a", model="proxy")
    return path


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A 2048x1536 synthetic slide with two tumour regions, its annotation, its bag, a model."""
    root = tmp_path_factory.mktemp("predict")
    synthetic = write_synthetic_slide(root / "s1.tiff", SyntheticSlideSpec(
        width=2048, height=1536, mpp=0.5, tumour_regions=2, seed=5))
    annotation = root / "annotations" / "s1.geojson"
    annotation.parent.mkdir()
    annotation.write_text(json.dumps(tumour_geojson(synthetic.tumour_polygons)))
    bag = tile_slide(synthetic.path, root / "s1.h5",
                     TilingOptions(target_mpp=TARGET_MPP, patch_size=PATCH),
                     annotation=annotation, progress=False).bag_path
    return {"root": root, "slide": synthetic, "annotation": annotation, "bag": bag,
            "model": _save(root / "private.pt")}


def _tumour_fractions(bag):
    with h5py.File(bag, "r") as f:
        return f["labels"][()].astype(np.float64)


def test_predict_gives_the_evaluation_score_for_a_slide_and_its_bag(slide, tmp_path):
    module, card = load_model(slide["model"])
    expected = model_aggregator(card).score(module, BagReader(), index_bag(slide["bag"], 1))
    rows, errors = predict_slides(slide["model"], [slide["slide"].path, slide["bag"]],
                                  tmp_path, device="cpu", heatmaps=False, progress=False)
    assert errors == []
    assert [r.score for r in rows] == [expected, expected]
    assert [r.prediction for r in rows] == [int(expected >= 0.5)] * 2
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    assert lines[0] == "slide_id,score,prediction,threshold,n_patches,model"
    assert lines[1].split(",")[:2] == ["s1", repr(expected)]


@pytest.mark.parametrize("method", ["top_k", "attention_mil"])
def test_one_pass_gives_the_score_and_the_patch_probabilities(slide, method, tmp_path):
    module, card = load_model(slide["model"])
    bag, reader = index_bag(slide["bag"], None), BagReader()
    if method == "top_k":
        aggregator = model_aggregator(card)
    else:
        torch.manual_seed(0)
        in_features = feature_layers(module)[1].in_features
        aggregator = AttentionHead(GatedAttentionMIL(in_features=in_features, num_classes=2,
                                                      embed_dim=8, attention_dim=4))
    score, probabilities = aggregator.score_with_probabilities(module, reader, bag)
    assert score == aggregator.score(module, reader, bag)
    np.testing.assert_allclose(probabilities, patch_probabilities(module, reader, bag),
                               rtol=0, atol=1e-6)
    if method == "top_k":  # and predict, drawing a heatmap, gives evaluation's score
        rows, _ = predict_slides(slide["model"], [slide["bag"]], tmp_path, device="cpu",
                                 geojson=True, progress=False)
        assert rows[0].score == score


@pytest.mark.parametrize("inline", [False, True])
def test_the_aggregation_of_the_hospitals_decision_card_is_the_one_used(slide, tmp_path,
                                                                        inline):
    model = _save(tmp_path / "top1.pt", aggregation={"method": "top_k", "k": 1}, inline=inline)
    module, _ = load_model(model)
    top = patch_probabilities(module, BagReader(), index_bag(slide["bag"], None)).max()
    rows, _ = predict_slides(model, [slide["bag"]], tmp_path, device="cpu", heatmaps=False)
    assert rows[0].score == pytest.approx(top, abs=1e-12)


def test_a_shared_model_file_holds_no_decision_and_predict_reads_the_card(slide, tmp_path):
    model = _save(tmp_path / "models" / "proxy.pt", aggregation={"method": "top_k", "k": 2})
    document = torch.load(model, weights_only=True)
    assert document["shared"] and document["decision"] == {}  # nothing chosen on its slides
    card = decision_path(model)
    assert card == tmp_path / "models" / "proxy.decision"
    assert read_decision(model, document) == {"threshold": 0.5,
                                              "aggregation": {"method": "top_k", "k": 2}}
    rows, errors = predict_slides(model, [slide["bag"]], tmp_path, device="cpu",
                                  heatmaps=False, progress=False)
    assert errors == [] and rows[0].threshold == 0.5
    card.unlink()  # the model file alone, as it reaches another hospital
    with pytest.raises(ModelFileError, match=r"proxy.pt: no decision threshold: it is chosen "
                                             r"on the model's hospital's validation slides"):
        predict_slides(model, [slide["bag"]], tmp_path, device="cpu", progress=False)


def test_heatmap_has_the_slide_aspect_and_hot_cells_inside_the_tumour(slide, tmp_path):
    patches = read_patch_map(slide["bag"])
    fractions = _tumour_fractions(slide["bag"])  # a perfect model's probabilities
    figure = heatmap_figure(patches, fractions, None, "s1")
    axes = figure.axes[0]
    position = axes.get_position()
    fig_w, fig_h = figure.get_size_inches()
    assert position.width * fig_w / (position.height * fig_h) == pytest.approx(2048 / 1536)
    raster = np.ma.filled(axes.images[1].get_array(), np.nan)
    tumour = shapely.union_all([shapely.Polygon(p) for p in slide["slide"].tumour_polygons])
    rows, cols = np.nonzero(raster >= 0.9)
    assert len(rows) > 0
    step = patches.footprint
    for r, c in zip(rows, cols, strict=True):
        assert tumour.contains(shapely.Point((c + 0.5) * step, (r + 0.5) * step))
    assert np.count_nonzero(~np.isnan(raster)) == len(patches.coords)
    # And predict writes one per slide, with the annotation outlined.
    predict_slides(slide["model"], [slide["slide"].path], tmp_path, device="cpu",
                   annotations=slide["annotation"].parent, progress=False)
    assert (tmp_path / "heatmaps" / "s1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_geojson_regions_parse_and_cover_exactly_the_hot_patches(slide, tmp_path):
    patches = read_patch_map(slide["bag"])
    fractions = _tumour_fractions(slide["bag"])
    collection = json.loads(json.dumps(tumour_regions(patches, fractions, 0.5)))
    assert collection["type"] == "FeatureCollection" and collection["features"]
    regions = [shape(f["geometry"]) for f in collection["features"]]
    hot = shapely.union_all([box(*b) for b in patches.boxes()[fractions >= 0.5].tolist()])
    assert shapely.union_all(regions).symmetric_difference(hot).area == 0
    for feature in collection["features"]:
        properties = feature["properties"]
        assert properties["objectType"] == "annotation"
        assert properties["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
        assert 0.5 <= properties["measurements"]["probability"] <= 1.0
    assert main(["predict", "--model", str(slide["model"]), str(slide["bag"]), "-o",
                 str(tmp_path), "--geojson", "--no-heatmap", "--device", "cpu"]) == 0
    written = json.loads((tmp_path / "regions" / "s1.geojson").read_text())
    assert written["type"] == "FeatureCollection"


def test_a_bag_tiled_at_another_mpp_is_refused_in_one_line(slide, tmp_path, capsys):
    model = _save(tmp_path / "at1.pt", target_mpp=1.0)
    assert main(["predict", "--model", str(model), str(slide["bag"]), "-o",
                 str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error
    assert error.startswith(f"error: {slide['bag']}: bag has 32-px patches at 2 µm/px but")
    assert "1 µm/px" in error
    assert not (tmp_path / "out" / "predictions.csv").exists()


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_a_bad_model_file_is_one_line(slide, tmp_path, capsys, damage):
    bad = tmp_path / "bad.pt"
    saved = slide["model"].read_bytes()
    bad.write_bytes(saved[: len(saved) // 2] if damage == "truncated" else b"not a model")
    assert main(["predict", "--model", str(bad), str(slide["bag"]), "-o", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"error: {bad}: not a ")


def test_bad_slides_are_one_line_each_and_the_others_are_still_scored(slide, tmp_path, capsys):
    no_mpp = write_synthetic_slide(tmp_path / "no_mpp.tiff",
                                   SyntheticSlideSpec(width=1024, height=1024, mpp=None)).path
    coarse = write_synthetic_slide(tmp_path / "coarse.tiff",
                                   SyntheticSlideSpec(width=1024, height=1024, mpp=4.0)).path
    missing = tmp_path / "missing.svs"
    args = ["predict", "--model", str(slide["model"]), "--no-heatmap", "-o", str(tmp_path)]
    assert main([*args, str(no_mpp), str(coarse), str(missing), str(slide["bag"])]) == 0
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3
    for path, error in zip((no_mpp, coarse, missing), errors, strict=True):
        assert error.startswith(f"error: {path}")
    assert "coarser than" in errors[1]
    assert main([*args, str(no_mpp), str(coarse)]) == 1
    assert main([*args, "--fill-mpp", "0.5", str(no_mpp)]) == 0


def test_workers_tile_the_same_patches_and_give_the_same_score(slide, tmp_path):
    one, _ = predict_slides(slide["model"], [slide["slide"].path], tmp_path / "one",
                            heatmaps=False, progress=False)
    two, _ = predict_slides(slide["model"], [slide["slide"].path], tmp_path / "two",
                            workers=2, heatmaps=False, progress=False)
    assert one == two and one[0].n_patches == index_bag(slide["bag"], None).n_patches


def test_bench_predict_times_every_variant_on_the_slides_patches(slide):
    result = bench_predict(slide["model"], [slide["slide"].path], readers=2, repeats=2)
    assert result["patches"] == index_bag(slide["bag"], None).n_patches
    assert set(result["variants"]) == {"forward", "read", "streamed", "streamed_one_reader",
                                       "serial", "predict", "predict_heatmap"}
    forward, read = result["variants"]["forward"], result["variants"]["read"]
    assert forward["ratio_to_forward"] == 1.0 and result["readers"] == 2
    cores, threads = result["cores"], result["torch_threads"]
    bounds = [min(1.0, cores / (threads + f / r))
              for f, r in zip(forward["per_repeat"], read["per_repeat"], strict=True)]
    assert result["core_bound"] == pytest.approx(np.median(bounds), abs=1e-3)
    for row in result["variants"].values():
        assert len(row["per_repeat"]) == 2 and row["patches_per_s"] == max(row["per_repeat"])
        assert row["median_patches_per_s"] <= row["patches_per_s"]
        paired = [r / f for r, f in zip(row["per_repeat"], forward["per_repeat"], strict=True)]
        assert row["paired_ratio_to_forward"] == pytest.approx(np.median(paired), abs=1e-3)

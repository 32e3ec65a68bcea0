"""``slidefed heatmap RUN_DIR``: a short run's slides drawn from their bags and QC pictures."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import shapely
from PIL import Image
from shapely.geometry import box
from slide_bags import slide_config, write_cohort

from federation import run_files
from federation.config import config_from_dict
from federation.data.bags import index_bag
from federation.evaluation import run_heatmaps
from federation.evaluation.heatmap import DPI, heatmap_figure, probability_raster
from federation.loop import run_federation
from slidefed.cli import main

PATCHES, SIZE = 12, 32  # write_cohort's bags: one row of 12 patches, 128 level-0 px each


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One hospital of six slides, a QC picture for each, and a short Regular run on them."""
    root = tmp_path_factory.mktemp("heatmap_cohort")
    write_cohort(root, {"h_a": 6}, patches=PATCHES, size=SIZE)
    (root / "h_a" / "qc").mkdir()
    for s in range(6):  # like preprocessing's, at a quarter of level 0
        Image.new("RGB", (PATCHES * SIZE, SIZE), (200, 150, 180)).save(
            root / "h_a" / "qc" / f"h_a_{s:03d}.png")
    out = tmp_path_factory.mktemp("heatmap_run")
    run_federation(config_from_dict(slide_config(
        root, out, ["h_a"], algorithm="regular", rounds=4,
        **{"dp.enabled": False, "model.private": "cnn1"})))
    return root, out


def test_heatmaps_have_the_slide_aspect_and_hot_cells_on_the_tumour_patches(run, monkeypatch):
    root, out = run
    drawn = []
    real = run_heatmaps.write_heatmap

    def spy(path, patches, probabilities, thumbnail, title, outlines=()):
        drawn.append((path, patches, probabilities, thumbnail, title, outlines))
        return real(path, patches, probabilities, thumbnail, title, outlines)

    monkeypatch.setattr(run_heatmaps, "write_heatmap", spy)
    written = run_heatmaps.draw_run_heatmaps(out, split="train", progress=False)
    assert [h.path for h in written] == [d[0] for d in drawn]
    assert len(written) == 2  # 2 training slides
    tumour_slides = 0
    for path, patches, probabilities, thumbnail, title, outlines in drawn:
        heatmaps = out / "hospitals" / "h_a" / "heatmaps"
        assert path == heatmaps / "private" / f"{patches.slide_id}.png"
        figure = heatmap_figure(patches, probabilities, thumbnail, title, outlines)
        with Image.open(path) as png:
            assert png.size == tuple(round(v * DPI) for v in figure.get_size_inches())
        position = figure.axes[0].get_position()
        fig_w, fig_h = figure.get_size_inches()
        assert position.width * fig_w / (position.height * fig_h) == pytest.approx(
            PATCHES * 4 * SIZE / (4 * SIZE))
        qc = np.asarray(Image.open(root / "h_a" / "qc" / f"{patches.slide_id}.png"))
        np.testing.assert_array_equal(thumbnail, qc)
        bag = index_bag(root / "h_a" / "bags" / f"{patches.slide_id}.h5", None)
        tumour = bag.patch_labels == 1
        # The outline is the annotated tumour patches' footprint, and the hottest cells are
        # those patches.
        footprint = shapely.union_all([box(*b) for b in patches.boxes()[tumour].tolist()])
        assert shapely.union_all(outlines).symmetric_difference(footprint).area == 0
        raster = probability_raster(patches, probabilities)[0]
        if tumour.any():
            tumour_slides += 1
            hottest = np.argsort(raster)[-tumour.sum():]
            cells = patches.coords[tumour, 0] // patches.footprint
            assert sorted(hottest) == sorted(cells)
        assert "h_a private" in title
    assert tumour_slides == 1


def test_the_command_writes_the_split_asked_and_refuses_a_bad_hospital(run, capsys):
    _, out = run
    assert main(["heatmap", str(out), "--split", "test", "--limit", "1"]) == 0
    assert len(list((out / "hospitals" / "h_a" / "heatmaps" / "private").glob("*.png"))) >= 1
    # The index lists this call's heatmap only, not the training slides' drawn before.
    with (out / run_files.HEATMAPS).open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["hospital"], r["model"], r["split"]) for r in rows] == [("h_a", "private", "test")]
    assert (out / rows[0]["path"]).is_file() and rows[0]["label"] in ("0", "1")
    assert int(rows[0]["prediction"]) in (0, 1) and 0 <= float(rows[0]["score"]) <= 1
    assert main(["heatmap", str(out), "--hospital", "h_z"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no hospital h_z in this run" in error

"""Tiling: patches of a real Aperio slide come from tissue and equal what OpenSlide reads;
patch labels of a synthetic slide are the exact tumour fractions of its annotation."""

from __future__ import annotations

import json
from dataclasses import replace

import h5py
import numpy as np
import openslide
import pytest
import shapely
from PIL import Image

from preprocessing import tile
from preprocessing.tile import TilingOptions, tile_slide
from wsi.bag import PatchEncoding, check_bag, read_labels, read_patches
from wsi.slide import SlideError
from wsi.synthetic import SyntheticSlideSpec, tumour_geojson, write_synthetic_slide


@pytest.fixture(scope="module")
def real_bag(real_slide, tmp_path_factory):
    out = tmp_path_factory.mktemp("bag")
    result = tile_slide(real_slide, out / "cmu.h5", TilingOptions(), qc_path=out / "cmu.png",
                        progress=False)
    return result, out


def test_real_slide_bag_is_valid_and_complete(real_bag):
    result, out = real_bag
    assert check_bag(result.bag_path, deep=True) == result.n_patches > 10
    assert (out / "cmu.png").stat().st_size > 10_000
    with h5py.File(result.bag_path, "r") as f:
        assert f.attrs["vendor"] == "aperio"
        assert f.attrs["mpp_level0"] == pytest.approx(0.499)
        assert f.attrs["target_mpp"] == 0.5 and f.attrs["read_level"] == 0
        assert (f["tissue_fraction"][()] >= 0.5).all()


@pytest.mark.parametrize("encoding, tolerance", [("deflate", 0.0), ("jpeg", 4.0)])
def test_patches_match_bare_openslide_reads_of_their_coords(real_slide, tmp_path, encoding,
                                                            tolerance):
    options = TilingOptions(encoding=PatchEncoding(encoding))
    result = tile_slide(real_slide, tmp_path / "b.h5", options, progress=False)
    osr = openslide.OpenSlide(real_slide)
    with h5py.File(result.bag_path, "r") as f:
        coords, size = f["coords"][()], f["coords"].attrs["patch_size"]
        picked = np.linspace(0, len(coords) - 1, 6).astype(int)
        patches = read_patches(f, picked).astype(float)
    for patch, (x, y) in zip(patches, coords[picked], strict=True):
        expected = np.asarray(osr.read_region((int(x), int(y)), 0, (size, size)))[..., :3]
        assert np.abs(patch - expected).mean() <= tolerance


def test_patches_come_from_tissue_not_glass(real_bag, real_slide):
    result, _ = real_bag
    osr = openslide.OpenSlide(real_slide)
    with h5py.File(result.bag_path, "r") as f:
        coords = f["coords"][()]
        patches = read_patches(f, range(len(coords))).astype(float)
    step = 256
    kept = {tuple(c) for c in coords.tolist()}
    glass = [(x, y) for y in range(0, 2967 - step, step) for x in range(0, 2220 - step, step)
             if (x, y) not in kept]
    glass_pixels = np.stack([np.asarray(osr.read_region(c, 0, (step, step)))[..., :3]
                             for c in glass[:10]]).astype(float)

    def chroma(a):
        return (a.max(-1) - a.min(-1)).mean()

    assert patches.mean() < glass_pixels.mean() - 20
    assert chroma(patches) > 2 * chroma(glass_pixels)


def test_parallel_tiling_writes_the_same_bag(real_bag, real_slide, tmp_path, monkeypatch):
    result, _ = real_bag
    monkeypatch.setattr(tile, "MIN_PATCHES_PER_WORKER", 1)  # 38 patches would stay serial
    monkeypatch.setattr(tile, "MIN_READ_PIXELS_PER_WORKER", 1)
    parallel = tile_slide(real_slide, tmp_path / "p.h5", TilingOptions(), workers=2,
                          progress=False)
    with h5py.File(result.bag_path, "r") as a, h5py.File(parallel.bag_path, "r") as b:
        np.testing.assert_array_equal(a["coords"][()], b["coords"][()])
        everything = range(len(a["coords"]))
        np.testing.assert_array_equal(read_patches(a, everything), read_patches(b, everything))


def test_workers_are_used_only_for_slides_with_enough_patches(real_slide, tmp_path,
                                                              monkeypatch):
    # A 35-patch slide took 1.6x as long with 2 workers: starting the pool cost more than it
    # saved. Below MIN_PATCHES_PER_WORKER patches per worker no pool starts.
    per = tile.MIN_PATCHES_PER_WORKER
    assert tile.tiling_workers(per - 1, 256, 4) == 1 and tile.tiling_workers(2 * per, 256, 4) == 2
    assert tile.tiling_workers(100 * per, 256, 4) == 4
    assert tile.tiling_workers(100 * per, 256, 1) == 1
    # Patches read at 128 px cost a quarter as much: each worker needs four times as many.
    assert tile.tiling_workers(2 * per, 128, 4) == 1 and tile.tiling_workers(8 * per, 128, 4) == 2
    assert tile.tiling_workers(2 * per, 1024, 4) == 2  # never fewer than 64 patches a worker

    def no_pool(method):
        raise AssertionError("a worker pool was started for a small slide")

    monkeypatch.setattr(tile.multiprocessing, "get_context", no_pool)
    result = tile_slide(real_slide, tmp_path / "small.h5", TilingOptions(), workers=4,
                        progress=False)
    assert 0 < result.n_patches < 4 * per


def test_resized_patches_match_a_downscaled_read(real_slide, tmp_path):
    result = tile_slide(real_slide, tmp_path / "r.h5", TilingOptions(target_mpp=1.0,
                                                                      patch_size=128),
                        progress=False)
    osr = openslide.OpenSlide(real_slide)
    with h5py.File(result.bag_path, "r") as f:
        size = f["coords"].attrs["patch_size"]
        x, y = f["coords"][0]
        patch = read_patches(f, [0])[0].astype(float)
    assert patch.shape == (128, 128, 3)
    region = np.asarray(osr.read_region((int(x), int(y)), 0, (size, size)))[..., :3]
    # An independent downscale (a different filter) of the same region agrees closely.
    reference = np.asarray(Image.fromarray(region).resize((128, 128), Image.Resampling.LANCZOS),
                           dtype=float)
    assert np.abs(patch - reference).mean() < 8


@pytest.fixture(scope="module")
def tumour_slide(tmp_path_factory):
    """A synthetic slide with two tumour regions and their GeoJSON annotation."""
    out = tmp_path_factory.mktemp("tumour")
    spec = SyntheticSlideSpec(width=3072, height=2560, tumour_regions=2, seed=5,
                              level_downsample=2, smallest_level_px=512)
    slide = write_synthetic_slide(out / "t.tiff", spec)
    annotation = out / "t.geojson"
    annotation.write_text(json.dumps(tumour_geojson(slide.tumour_polygons)))
    return slide, annotation


SMALL_PATCHES = TilingOptions(patch_size=128)


def test_annotated_slide_bag_holds_exact_tumour_fractions(tumour_slide, tmp_path):
    slide, annotation = tumour_slide
    result = tile_slide(slide.path, tmp_path / "t.h5", SMALL_PATCHES, annotation=annotation,
                        slide_label=1, progress=False)
    assert check_bag(result.bag_path, deep=True) == result.n_patches
    with h5py.File(result.bag_path, "r") as f:
        labels, coords = f["labels"], f["coords"][()]
        step = int(f["coords"].attrs["patch_size_level0"])
        assert labels.dtype == np.float32 and labels.shape == (len(coords),)
        assert labels.attrs["source"] == "annotation" and labels.attrs["threshold"] == 0.5
        assert f.attrs["mpp_source"] == "file" and f.attrs["format_version"] == 2
        fractions = labels[()]
    # The annotation as written (coordinates rounded to 0.01 px), read here by shapely alone.
    tumour = shapely.union_all([shapely.geometry.shape(f["geometry"]) for f in
                                json.loads(annotation.read_text())["features"]])
    expected = [shapely.box(x, y, x + step, y + step).intersection(tumour).area / step ** 2
                for x, y in coords]
    np.testing.assert_allclose(fractions, expected, atol=1e-6)
    assert (fractions >= 0.5).sum() >= 5 and (fractions == 0).sum() >= 5  # both kinds exist
    assert ((fractions > 0) & (fractions < 1)).any()  # and patches on the border


def test_weak_labels_no_labels_and_overridden_mpp(tumour_slide, tmp_path):
    slide, _ = tumour_slide
    weak = tile_slide(slide.path, tmp_path / "w.h5", SMALL_PATCHES, slide_label=1,
                      progress=False)
    none = tile_slide(slide.path, tmp_path / "n.h5", replace(SMALL_PATCHES, override_mpp=0.25),
                      progress=False)
    with h5py.File(weak.bag_path, "r") as f:
        labels = read_labels(f)
        assert labels.source == "slide" and (labels.values == 1).all()
        assert len(labels.values) == weak.n_patches
    with h5py.File(none.bag_path, "r") as f:
        assert "labels" not in f and f.attrs["mpp_source"] == "override"
    with pytest.raises(SlideError, match="slide label must be 0 or 1, got 2"):
        tile_slide(slide.path, tmp_path / "x.h5", SMALL_PATCHES, slide_label=2, progress=False)


def test_bench_tiling_reports_the_per_slide_overhead(real_slide):
    from benchmarks.tiling import bench_tiling

    row = bench_tiling(real_slide, TilingOptions(), workers=2)  # 38 patches: no pool
    assert row["n_patches"] > 0 and row["workers_used"] == 1
    assert row["per_slide_overhead_s"] == pytest.approx(
        row["overhead_layout_s"] + row["overhead_qc_s"], abs=2e-3)
    assert 0 < row["overhead_qc_s"] < row["per_slide_overhead_s"]

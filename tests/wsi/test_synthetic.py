"""Synthetic slides, read back through OpenSlide as a real slide would be."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import openslide
import pytest
from matplotlib.path import Path as MplPath
from skimage.color import rgb2hed

from wsi import synthetic
from wsi.synthetic import (
    StainProfile,
    SyntheticSlide,
    SyntheticSlideSpec,
    hospital_stain_profile,
    tumour_geojson,
    write_synthetic_slide,
    written_with,
)


def read_level(path: Path, level: int) -> np.ndarray:
    with openslide.OpenSlide(path) as slide:
        size = slide.level_dimensions[level]
        return np.asarray(slide.read_region((0, 0), level, size).convert("RGB"))


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = image.shape[0] // factor, image.shape[1] // factor
    blocks = image[:h * factor, :w * factor].reshape(h, factor, w, factor, -1)
    return blocks.astype(float).mean(axis=(1, 3))


def glass_mask(rgb: np.ndarray) -> np.ndarray:
    """Bright, grey pixels: bare glass."""
    rgb = rgb.astype(int)
    return (rgb.min(axis=-1) > 215) & (rgb.max(axis=-1) - rgb.min(axis=-1) < 20)


@pytest.fixture(scope="module")
def tumour_slide(tmp_path_factory) -> SyntheticSlide:
    spec = SyntheticSlideSpec(3072, 2560, tumour_regions=2, seed=11)
    return write_synthetic_slide(tmp_path_factory.mktemp("slides") / "tumour.tiff", spec)


@pytest.fixture(scope="module")
def three_level_slide(tmp_path_factory) -> SyntheticSlide:
    spec = SyntheticSlideSpec(2048, 1792, tumour_regions=1, seed=4, level_downsample=2,
                              smallest_level_px=600)
    return write_synthetic_slide(tmp_path_factory.mktemp("slides") / "three.tiff", spec)


def test_openslide_reads_the_pyramid_as_designed(tumour_slide, three_level_slide):
    cases = [(tumour_slide, [(3072, 2560), (768, 640)], [1, 4]),
             (three_level_slide, [(2048, 1792), (1024, 896), (512, 448)], [1, 2, 4])]
    for slide, dimensions, downsamples in cases:
        with openslide.OpenSlide(slide.path) as reader:
            assert reader.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
            assert list(reader.level_dimensions) == dimensions
            assert reader.level_downsamples == pytest.approx(downsamples)
            assert reader.properties["openslide.level[0].tile-width"] == "256"
        assert slide.spec.level_dimensions == dimensions


def test_pyramid_stops_when_the_smallest_level_fits():
    spec = SyntheticSlideSpec(100_000, 60_000)
    assert spec.level_dimensions == [(100_000, 60_000), (25_000, 15_000), (6250, 3750),
                                     (1563, 938)]
    assert SyntheticSlideSpec(1500, 900).level_dimensions == [(1500, 900)]


@pytest.mark.parametrize("mpp", [0.25, 0.5021])
def test_openslide_reports_the_spec_mpp(tmp_path, mpp):
    slide = write_synthetic_slide(tmp_path / "s.tiff", SyntheticSlideSpec(512, 384, mpp=mpp))
    with openslide.OpenSlide(slide.path) as reader:
        assert float(reader.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(mpp)
        assert float(reader.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(mpp)


def test_no_mpp_writes_no_resolution(tmp_path):
    slide = write_synthetic_slide(tmp_path / "s.tiff", SyntheticSlideSpec(512, 384, mpp=None))
    with openslide.OpenSlide(slide.path) as reader:
        assert openslide.PROPERTY_NAME_MPP_X not in reader.properties
        assert openslide.PROPERTY_NAME_MPP_Y not in reader.properties


def test_glass_is_near_white_and_tissue_covers_part_of_the_slide(tumour_slide):
    rgb = read_level(tumour_slide.path, 1).astype(float)
    background = np.asarray(tumour_slide.spec.stain.background, float)
    assert background.min() > 220
    glass = np.abs(rgb - background).max(axis=-1) < 8
    assert 0.3 < glass.mean() < 0.7
    assert 0.3 < (~glass_mask(rgb)).mean() < 0.7
    assert 0.3 < rgb[glass].std(axis=0).max() < 3  # slight noise, not flat


def test_tissue_has_hematoxylin_and_eosin_hues(tumour_slide):
    rgb = read_level(tumour_slide.path, 1).astype(float)
    tissue = rgb[~glass_mask(rgb)]
    red, green, blue = tissue.mean(axis=0)
    assert red > green + 20 and blue > green + 20
    # Nuclei (strong hematoxylin) are bluish purple: blue above red.
    hed = rgb2hed(rgb.astype(np.uint8))
    nuclear = rgb[hed[..., 0] > np.quantile(hed[..., 0], 0.98)]
    assert nuclear[:, 2].mean() > nuclear[:, 0].mean()


def test_tumour_has_more_and_darker_nuclei_than_normal_tissue(tumour_slide):
    for level, downsample in ((0, 1), (1, 4)):
        rgb = read_level(tumour_slide.path, level)
        hematoxylin = rgb2hed(rgb)[..., 0]
        tumour = tumour_slide.tumour_mask(downsample)
        normal = ~glass_mask(rgb) & ~tumour
        assert tumour.mean() > 0.05 and normal.mean() > 0.05
        assert hematoxylin[tumour].mean() > 1.5 * hematoxylin[normal].mean()
        dark = rgb.astype(int).sum(axis=-1) < 350
        assert dark[tumour].mean() > 3 * dark[normal].mean()


def test_tumour_contrast_moves_tumour_nuclei_from_normal_to_full(tmp_path):
    ratios = []
    for contrast in (0.0, 0.5, 1.0):
        spec = SyntheticSlideSpec(1024, 1024, tumour_regions=1, seed=11, tumour_contrast=contrast)
        slide = write_synthetic_slide(tmp_path / f"{contrast}.tiff", spec)
        rgb = read_level(slide.path, 0)
        hematoxylin = rgb2hed(rgb)[..., 0]
        tumour = slide.tumour_mask(1)
        normal = ~glass_mask(rgb) & ~tumour
        assert tumour.mean() > 0.05
        ratios.append(hematoxylin[tumour].mean() / hematoxylin[normal].mean())
    assert ratios[0] < 1.2 < ratios[1] < ratios[2], ratios


def test_inflamed_regions_crowd_dark_nuclei_and_are_not_tumour(tmp_path):
    spec = SyntheticSlideSpec(1024, 1024, inflamed_regions=2, seed=12)
    slide = write_synthetic_slide(tmp_path / "inflamed.tiff", spec)
    assert slide.tumour_polygons == []
    polygons = synthetic._SlideModel(spec).inflamed_polygons
    assert len(polygons) == 2
    inflamed = SyntheticSlide(slide.path, spec, polygons).tumour_mask(1)
    rgb = read_level(slide.path, 0)
    normal = ~glass_mask(rgb) & ~inflamed
    dark = rgb.astype(int).sum(axis=-1) < 350
    assert inflamed.mean() > 0.01
    assert dark[inflamed].mean() > 1.5 * dark[normal].mean()


def test_tumour_foci_are_small():
    spec = SyntheticSlideSpec(2560, 2240, tumour_foci=2, seed=13)
    polygons = SyntheticSlide.from_spec(Path("unused.tiff"), spec).tumour_polygons
    assert len(polygons) == 2
    for polygon in polygons:
        radius_um = math.sqrt(synthetic._polygon_area(polygon) / math.pi) * spec.mpp
        assert 30 < radius_um < 75


def test_lower_levels_look_like_block_averaged_level_zero(three_level_slide):
    level0 = read_level(three_level_slide.path, 0)
    for level, factor in ((1, 2), (2, 4)):
        low = read_level(three_level_slide.path, level).astype(float)
        averaged = block_mean(level0, factor)
        low = low[:averaged.shape[0], :averaged.shape[1]]
        # Whole image and 128-px blocks of level 0 (tissue, tumour, glass alike) agree.
        assert np.abs(low.mean(axis=(0, 1)) - averaged.mean(axis=(0, 1))).max() < 1.5
        k = 128 // factor
        assert np.abs(block_mean(low, k) - block_mean(averaged, k)).max() < 6


def test_content_does_not_depend_on_the_tiling(tmp_path):
    a = write_synthetic_slide(tmp_path / "a.tiff",
                              SyntheticSlideSpec(1024, 768, tumour_regions=1, seed=3))
    b = write_synthetic_slide(tmp_path / "b.tiff",
                              SyntheticSlideSpec(1024, 768, tumour_regions=1, seed=3,
                                                 tile_size=128))
    difference = np.abs(read_level(a.path, 0).astype(int) - read_level(b.path, 0))
    # Only per-tile pixel noise and JPEG blocking differ, not nuclei or stroma.
    assert difference.mean() < 3
    assert np.quantile(difference, 0.99) < 20


def test_same_seed_gives_identical_pixels_and_another_seed_does_not(tmp_path):
    spec = SyntheticSlideSpec(1024, 768, tumour_regions=1, seed=5)
    first = read_level(write_synthetic_slide(tmp_path / "1.tiff", spec).path, 0)
    again = read_level(write_synthetic_slide(tmp_path / "2.tiff", spec).path, 0)
    other = SyntheticSlideSpec(1024, 768, tumour_regions=1, seed=6)
    different = read_level(write_synthetic_slide(tmp_path / "3.tiff", other).path, 0)
    assert np.array_equal(first, again)
    assert np.abs(first.astype(int) - different).mean() > 10


def test_hospitals_have_different_colours(tmp_path):
    assert hospital_stain_profile(2) == hospital_stain_profile(2)
    means = []
    for hospital in range(3):
        spec = SyntheticSlideSpec(1024, 1024, seed=8, stain=hospital_stain_profile(hospital))
        rgb = read_level(write_synthetic_slide(tmp_path / f"{hospital}.tiff", spec).path, 0)
        means.append(rgb[~glass_mask(rgb)].astype(float).mean(axis=0))
    for i in range(3):
        for j in range(i):
            assert np.abs(means[i] - means[j]).max() > 5, (i, j, means)


def test_stain_profile_normalises_and_validates():
    profile = StainProfile(hematoxylin_od=(2.0, 2.0, 1.0))
    assert np.linalg.norm(profile.hematoxylin_od) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="eosin_od"):
        StainProfile(eosin_od=(0.1, -0.9, 0.1))
    with pytest.raises(ValueError, match="background"):
        StainProfile(background=(0, 240, 240))
    with pytest.raises(ValueError, match="index"):
        hospital_stain_profile(-1)


@pytest.mark.parametrize("field, value", [("width", 0), ("tile_size", 100), ("mpp", 0.0),
                                          ("jpeg_quality", 101), ("level_downsample", 1),
                                          ("tumour_foci", -1), ("tumour_contrast", 1.5),
                                          ("tissue_fraction", (0.7, 0.5))])
def test_invalid_spec_is_rejected(field, value):
    arguments = {"width": 512, "height": 512, field: value}
    with pytest.raises(ValueError, match=field):
        SyntheticSlideSpec(**arguments)


def test_tumour_mask_rasterises_the_polygons(tumour_slide):
    polygons = tumour_slide.tumour_polygons
    assert len(polygons) == 2
    downsample = 8
    mask = tumour_slide.tumour_mask(downsample)
    assert mask.shape == (math.ceil(2560 / downsample), math.ceil(3072 / downsample))
    rows, cols = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
    centres = np.column_stack([(cols.ravel() + 0.5) * downsample,
                               (rows.ravel() + 0.5) * downsample])
    inside = np.zeros(len(centres), dtype=bool)
    for polygon in polygons:
        inside |= MplPath(polygon).contains_points(centres)
    assert np.mean(inside != mask.ravel()) < 0.002  # only points on an edge may disagree
    assert mask.mean() > 0.05
    # Same regions at any downsample.
    assert tumour_slide.tumour_mask(2.5).mean() == pytest.approx(mask.mean(), abs=0.005)


def test_normal_slide_has_no_tumour(tmp_path):
    slide = SyntheticSlide.from_spec(tmp_path / "unused.tiff", SyntheticSlideSpec(2048, 2048))
    assert slide.tumour_polygons == []
    assert not slide.tumour_mask(16).any()
    assert not (tmp_path / "unused.tiff").exists()


def test_from_spec_gives_the_polygons_of_the_written_slide(tumour_slide):
    again = SyntheticSlide.from_spec(tumour_slide.path, tumour_slide.spec)
    assert all(np.array_equal(a, b) for a, b in zip(again.tumour_polygons,
                                                     tumour_slide.tumour_polygons, strict=True))
    assert written_with(tumour_slide.path, tumour_slide.spec)
    assert not written_with(tumour_slide.path, SyntheticSlideSpec(3072, 2560, seed=11))


def test_geojson_is_a_qupath_style_feature_collection(tumour_slide):
    document = json.loads(json.dumps(tumour_geojson(tumour_slide.tumour_polygons)))
    assert document["type"] == "FeatureCollection"
    assert len(document["features"]) == len(tumour_slide.tumour_polygons)
    for feature, polygon in zip(document["features"], tumour_slide.tumour_polygons, strict=True):
        assert feature["type"] == "Feature"
        assert feature["properties"]["classification"]["name"] == "Tumor"
        assert feature["geometry"]["type"] == "Polygon"
        (ring,) = feature["geometry"]["coordinates"]
        assert ring[0] == ring[-1]  # closed
        assert np.allclose(np.asarray(ring[:-1]), polygon, atol=0.01)
    assert tumour_geojson([]) == {"type": "FeatureCollection", "features": []}


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def failing_render(self, level, tx, ty):
        calls.append((level, tx, ty))
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return np.full((256, 256, 3), 255, np.uint8)

    monkeypatch.setattr(synthetic._SlideModel, "render_tile", failing_render)
    with pytest.raises(RuntimeError, match="disk full"):
        write_synthetic_slide(tmp_path / "s.tiff", SyntheticSlideSpec(1024, 1024))
    assert list(tmp_path.iterdir()) == []


# Peak RSS from VmHWM: ru_maxrss survives execve, so a child of a big pytest process would
# report its parent's size.
BIG_SLIDE_SCRIPT = textwrap.dedent("""
    import sys
    from benchmarks.tiling import peak_rss_mb
    from wsi.synthetic import SyntheticSlideSpec, write_synthetic_slide
    side = int(sys.argv[2])
    write_synthetic_slide(sys.argv[1], SyntheticSlideSpec(side, side, tumour_regions=2, seed=1))
    print(peak_rss_mb())
""")


@pytest.mark.slow
def test_large_slide_is_written_in_little_memory(tmp_path):
    """16,000² px (256 Mpx, 768 MB of raw RGB) in bounded memory: well under one level's size."""
    side = 16_000
    path = tmp_path / "big.tiff"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", BIG_SLIDE_SCRIPT, str(path), str(side)],
                            capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[2])
    seconds = time.perf_counter() - started
    peak_mb = float(result.stdout.split()[-1])
    print(f"{side}x{side}: {seconds:.0f} s, {side * side / 1e6 / seconds:.1f} Mpx/s, "
          f"peak RSS {peak_mb:.0f} MB")
    assert peak_mb < 400
    with openslide.OpenSlide(path) as reader:
        assert reader.dimensions == (side, side)
        corner = np.asarray(reader.read_region((side - 300, side - 300), 0, (300, 300)))
        assert corner.shape == (300, 300, 4)

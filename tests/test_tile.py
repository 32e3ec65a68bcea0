"""Tiling a real Aperio slide: patches come from tissue and equal what OpenSlide reads."""

from __future__ import annotations

import h5py
import numpy as np
import openslide
import pytest
from PIL import Image

from preprocessing.tile import TilingOptions, tile_slide
from wsi.bag import PatchEncoding, check_bag, read_patches


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


def test_parallel_tiling_writes_the_same_bag(real_bag, real_slide, tmp_path):
    result, _ = real_bag
    parallel = tile_slide(real_slide, tmp_path / "p.h5", TilingOptions(), workers=2,
                          progress=False)
    with h5py.File(result.bag_path, "r") as a, h5py.File(parallel.bag_path, "r") as b:
        np.testing.assert_array_equal(a["coords"][()], b["coords"][()])
        everything = range(len(a["coords"]))
        np.testing.assert_array_equal(read_patches(a, everything), read_patches(b, everything))


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

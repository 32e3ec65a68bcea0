"""Direct JPEG tile decoding gives exactly OpenSlide's pixels, or is not used; decoding at a
DCT scale gives about the box means of full-resolution pixels."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile
from damage import zero_tile_data
from PIL import Image

from wsi.jpeg_tiles import JpegTiledLevel
from wsi.slide import SlideError, open_slide
from wsi.synthetic import SyntheticSlideSpec, write_synthetic_slide
from wsi.tissue import detect_tissue


def _openslide_rgb(osr, location, level, size):
    rgba = np.asarray(osr.read_region(location, level, size)).astype(float)
    alpha = rgba[..., 3:] / 255
    return (rgba[..., :3] * alpha + 255 * (1 - alpha) + 0.5).astype(np.uint8)


def _assert_same_as_openslide(path, regions=12):
    rng = np.random.default_rng(0)
    osr = openslide.OpenSlide(path)
    with open_slide(path) as slide:
        assert slide._jpeg is not None, "expected direct decoding for this file"
        for level in range(slide.info.level_count):
            downsample = slide.info.level_downsamples[level]
            width, height = slide.info.level_dimensions[level]
            for _ in range(regions):
                size = (int(rng.integers(1, 600)), int(rng.integers(1, 600)))
                # Some regions start before the slide or run past its end (white there).
                x, y = int(rng.integers(-40, width)), int(rng.integers(-40, height))
                location = (round(x * downsample), round(y * downsample))
                ours = slide.read_region(location, level, size)
                theirs = _openslide_rgb(osr, location, level, size)
                if downsample.is_integer():
                    np.testing.assert_array_equal(ours, theirs)
                else:  # OpenSlide resamples at the sub-pixel offset; we start on a pixel
                    assert np.abs(ours.astype(int) - theirs).mean() < 4


def test_real_aperio_rgb_coded_tiles_match_openslide(real_slide):
    _assert_same_as_openslide(real_slide)


def test_synthetic_ycbcr_pyramid_matches_openslide_at_every_level(tmp_path):
    spec = SyntheticSlideSpec(width=3000, height=2200, mpp=0.25, tumour_regions=1,
                              smallest_level_px=128)
    _assert_same_as_openslide(write_synthetic_slide(tmp_path / "s.tiff", spec).path)


def _deflate_tiff(tmp_path):
    """A 512×512 deflate-tiled TIFF of random pixels (no JPEG tiles) and its pixels."""
    path = tmp_path / "deflate.tiff"
    data = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    tifffile.imwrite(path, data, tile=(256, 256), photometric="rgb", compression="zlib",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    return path, data


def test_non_jpeg_tiles_stay_with_openslide(tmp_path):
    path, data = _deflate_tiff(tmp_path)
    with open_slide(path) as slide:
        assert slide._jpeg is None
        np.testing.assert_array_equal(slide.read_region((10, 20), 0, (100, 50)),
                                      data[20:70, 10:110])


def _box_reduced(slide, location, level, size, factor):
    return np.asarray(Image.fromarray(slide.read_region(location, level, size)).reduce(factor))


def _assert_near_box_means(slide, factor, mpp):
    """The DCT-scaled read of the whole level 0 against box means of its full-resolution
    pixels: close pixels, and tissue masks that differ at no more than a few border pixels."""
    size = slide.info.level_dimensions[0]
    scaled = slide.read_region_reduced((0, 0), 0, size, factor)
    box = _box_reduced(slide, (0, 0), 0, size, factor)
    assert scaled.shape == box.shape
    # The last row or column of an edge no multiple of the scale also averages tile padding.
    rows, cols = size[1] // factor, size[0] // factor
    error = np.abs(scaled.astype(int) - box)[:rows, :cols]
    assert error.mean() < 1.0 and np.percentile(error, 99.9) <= 16
    mask, box_mask = (detect_tissue(rgb, mpp * factor) for rgb in (scaled, box))
    assert box_mask.sum() > 0.1 * box_mask.size
    assert (mask != box_mask).sum() < 0.005 * box_mask.sum()


def test_real_rgb_coded_tiles_at_half_scale_are_near_box_means(real_slide):
    with open_slide(real_slide) as slide:
        assert slide._jpeg.levels[0].dct_scale(0, 0, 2) == 2
        _assert_near_box_means(slide, 2, slide.info.mpp)


@pytest.mark.parametrize("factor", [4, 8, 16])
def test_ycbcr_subsampled_tiles_at_dct_scales_are_near_box_means(tmp_path, factor):
    spec = SyntheticSlideSpec(width=2048, height=1520, mpp=0.25, smallest_level_px=4096)
    with open_slide(write_synthetic_slide(tmp_path / "s.tiff", spec).path) as slide:
        assert slide.info.level_count == 1 and slide._jpeg is not None
        _assert_near_box_means(slide, factor, 0.25)


def test_dct_scale_divides_factor_corner_and_tile():
    level = type("Level", (), {"tile_width": 256, "tile_height": 240})()
    scale = JpegTiledLevel.dct_scale
    assert [scale(level, 0, 0, f) for f in (1, 2, 3, 4, 6, 8, 12, 16)] == [1, 2, 1, 4, 2, 8, 4, 8]
    assert scale(level, 4, 0, 8) == 4 and scale(level, 0, 2, 8) == 2 and scale(level, 1, 0, 8) == 1


def test_reduced_reads_without_a_fitting_dct_scale_are_exact_box_means(real_slide, tmp_path):
    # Not JPEG: OpenSlide reads the region, then it is box-averaged.
    path, data = _deflate_tiff(tmp_path)
    with open_slide(path) as slide:
        assert slide._jpeg is None
        np.testing.assert_array_equal(slide.read_region_reduced((0, 0), 0, (512, 500), 4),
                                      np.asarray(Image.fromarray(data[:500]).reduce(4)))
    # JPEG, but a factor or a corner that no DCT scale divides: decoded at full resolution.
    with open_slide(real_slide) as slide:
        for location, factor in (((0, 0), 3), ((1001, 600), 2)):
            np.testing.assert_array_equal(
                slide.read_region_reduced(location, 0, (700, 500), factor),
                _box_reduced(slide, location, 0, (700, 500), factor))


def test_missing_tiles_read_as_white(real_slide, tmp_path):
    # Zero the byte count of one tile: OpenSlide shows such a tile as transparent glass.
    data = bytearray(real_slide.read_bytes())
    with tifffile.TiffFile(real_slide) as tif:
        page = tif.pages[0]
        tag = page.tags["TileByteCounts"]
        offset, width = tag.valueoffset, tag.valuebytecount // tag.count
    data[offset:offset + width] = bytes(width)  # first tile's byte count := 0
    path = tmp_path / "holey.svs"
    path.write_bytes(bytes(data))
    with open_slide(path) as slide:
        assert slide.info.vendor == "aperio" and slide._jpeg is not None
        region = slide.read_region((0, 0), 0, (300, 300))
        half = slide.read_region_reduced((0, 0), 0, (300, 300), 2)
    assert (region[:240, :240] == 255).all() and (region[240:, 240:] < 255).any()
    assert (half[:120, :120] == 255).all() and (half[120:, 120:] < 255).any()


def test_corrupt_tiles_are_a_slide_error_naming_the_file(real_slide, tmp_path):
    # The direct decoder used to let imagecodecs.Jpeg8Error escape, without the file's name.
    path = zero_tile_data(real_slide, tmp_path / "zeroed.svs", tiles=slice(5, 40))
    with open_slide(path) as slide:
        assert slide._jpeg is not None
        with pytest.raises(SlideError) as err:
            slide.read_region((0, 0), 0, (2220, 2967))
        with pytest.raises(SlideError) as scaled_err:
            slide.read_region_reduced((0, 0), 0, (2220, 2967), 8)
    message = str(err.value)
    assert message.startswith(f"{path}: cannot read region at (0, 0) level 0 (JPEG tile 5 ")
    assert "Not a JPEG file" in message and "\n" not in message
    assert str(scaled_err.value).startswith(f"{path}: cannot read region at (0, 0) level 0 "
                                            "(JPEG tile 5 is corrupt")

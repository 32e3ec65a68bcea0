"""Opening slides, resolution plans and tissue detection, on a real Aperio slide and bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from preprocessing.qc import INK_OUTLINE, TISSUE_OUTLINE, write_qc_picture
from wsi.resolution import plan_reading
from wsi.slide import SlideError, open_slide
from wsi.tissue import Overview, detect_tissue, pen_ink, slide_overview


def test_real_aperio_slide_reports_vendor_levels_and_mpp(real_slide):
    with open_slide(real_slide) as slide:
        info = slide.info
        assert info.vendor == "aperio"
        assert (info.width, info.height) == (2220, 2967)
        assert info.level_count == 1
        assert info.mpp == pytest.approx(0.499)
        assert info.mpp_source == "file"
        region = slide.read_region((0, 0), 0, (64, 32))
        assert region.shape == (32, 64, 3) and region.dtype == np.uint8


def test_fill_mpp_leaves_a_stated_mpp_alone_and_override_replaces_it(real_slide):
    # One --slide-mpp used to do both: a value meant for files without one replaced 0.499.
    with open_slide(real_slide, fill_mpp=0.25) as slide:
        assert slide.info.mpp == pytest.approx(0.499) and slide.info.mpp_source == "file"
    with open_slide(real_slide, override_mpp=0.25) as slide:
        assert slide.info.mpp == 0.25 and slide.info.mpp_source == "override"
    with pytest.raises(SlideError, match="--override-mpp must be a positive number"):
        open_slide(real_slide, override_mpp=-1.0)


def test_plan_reads_level0_without_resize_at_native_resolution(real_slide):
    with open_slide(real_slide) as slide:
        plan = plan_reading(slide.info, 0.5, 256)
    assert plan.read_level == 0 and plan.read_size == 256 and not plan.needs_resize


def test_plan_resizes_when_target_is_coarser_than_every_level(real_slide):
    with open_slide(real_slide) as slide:
        plan = plan_reading(slide.info, 1.0, 224)
    # 224 px at 1.0 µm/px cover 224 µm = 449 px at 0.499 µm/px.
    assert plan.read_level == 0 and plan.read_size == 449 and plan.needs_resize


def test_plan_refuses_to_invent_detail(real_slide):
    with open_slide(real_slide) as slide, pytest.raises(SlideError, match="coarser than"):
        plan_reading(slide.info, 0.25, 256)


def test_tissue_mask_covers_stained_tissue_not_glass(real_slide):
    with open_slide(real_slide) as slide:
        overview = slide_overview(slide)
    mask, rgb = overview.mask, overview.rgb.astype(float)
    assert 0.15 < mask.mean() < 0.7
    # Glass is bright and grey; tissue is darker and coloured (H&E).
    chroma = rgb.max(-1) - rgb.min(-1)
    assert rgb[~mask].mean() > rgb[mask].mean() + 30
    assert chroma[mask].mean() > 2 * chroma[~mask].mean()


def test_tissue_detection_finds_nothing_on_blank_glass():
    rng = np.random.default_rng(0)
    glass = (rng.normal(240, 3, (300, 300, 3))).clip(0, 255).astype(np.uint8)
    assert not detect_tissue(glass, mpp=8.0).any()


def test_tissue_detection_drops_specks_and_keeps_a_blob():
    rgb = np.full((400, 400, 3), 242, np.uint8)
    rgb[100:300, 100:300] = (180, 90, 170)  # H&E-coloured block: 1600x1600 µm at 8 µm/px
    rgb[20:22, 20:22] = (150, 40, 140)  # a 16x16 µm speck of dust
    mask = detect_tissue(rgb, mpp=8.0)
    assert mask[150:250, 150:250].all()
    assert not mask[15:30, 15:30].any()


def test_blue_and_green_pen_marks_are_not_tissue():
    # Marker ink is saturated, so it used to pass the tissue mask as readily as H&E does.
    rng = np.random.default_rng(0)
    rgb = rng.normal(242, 3, (400, 400, 3)).clip(0, 255).astype(np.uint8)  # glass, 8 µm/px
    rgb[100:300, 100:300] = (180, 90, 170)  # eosin-rich tissue
    rgb[150:250, 150:250] = (133, 126, 191)  # hematoxylin-rich tissue: blue, but R > G
    rgb[20:40, 20:380] = (40, 80, 190)  # blue stroke on glass, 160 µm x 2.9 mm
    rgb[330:350, 20:380] = (60, 150, 90)  # green stroke on glass
    rgb[100:300, 200:216] = (50, 90, 185)  # blue stroke across the tissue
    ink = pen_ink(rgb, mpp=8.0)
    assert ink[20:40, 20:380].all() and ink[330:350, 20:380].all()
    assert ink[100:300, 200:216].all() and not ink[100:300, 100:200].any()
    mask = detect_tissue(rgb, mpp=8.0)
    assert mask[110:290, 110:195].all() and mask[160:240, 220:240].all()
    assert not (mask & ink).any() and not mask[:60].any() and not mask[320:].any()


def test_qc_picture_outlines_pen_marks_apart_from_tissue(tmp_path):
    rgb = np.full((400, 400, 3), 242, np.uint8)
    rgb[100:300, 100:300] = (180, 90, 170)
    rgb[20:40, 20:380] = (40, 80, 190)
    ink = pen_ink(rgb, mpp=8.0)
    overview = Overview(rgb, detect_tissue(rgb, 8.0, ink), downsample=1.0, ink=ink)
    picture = np.asarray(Image.open(write_qc_picture(tmp_path / "qc.png", overview,
                                                     np.zeros((0, 2), int), 64)))
    scale = picture.shape[0] / 400
    stroke, tissue = picture[:round(60 * scale)], picture[round(80 * scale):]
    assert (stroke == INK_OUTLINE).all(-1).any() and not (stroke == TISSUE_OUTLINE).all(-1).any()
    assert (tissue == TISSUE_OUTLINE).all(-1).any() and not (tissue == INK_OUTLINE).all(-1).any()


def test_small_specks_of_ink_coloured_dye_are_not_pen_marks():
    rgb = np.full((400, 400, 3), 242, np.uint8)
    rgb[100:300, 100:300] = (180, 90, 170)
    rgb[100:104, 100:300] = (60, 150, 150)  # a dye fringe along the tissue's edge, 32 µm wide
    assert not pen_ink(rgb, mpp=8.0).any()
    assert detect_tissue(rgb, mpp=8.0)[100:104, 100:300].all()


def _write_tiled_tiff(path, resolution: bool) -> None:
    data = np.full((512, 512, 3), 230, np.uint8)
    kwargs = {"resolution": (1e4 / 0.5, 1e4 / 0.5), "resolutionunit": "CENTIMETER"} \
        if resolution else {}
    tifffile.imwrite(path, data, tile=(256, 256), photometric="rgb", **kwargs)


def test_slide_without_mpp_is_refused_unless_user_supplies_it(tmp_path):
    path = tmp_path / "nompp.tiff"
    _write_tiled_tiff(path, resolution=False)
    with pytest.raises(SlideError, match="no microns per pixel.*--fill-mpp") as err:
        open_slide(path)
    assert str(path) in str(err.value)
    with open_slide(path, fill_mpp=0.5) as slide:
        assert slide.info.mpp == 0.5 and slide.info.vendor == "generic-tiff"
        assert slide.info.mpp_source == "fill"


@pytest.mark.parametrize("resolution, unit, stated", [
    ((72, 72), "INCH", "352.778"),  # 72 dpi, a TIFF writer's default
    ((1e4 / 16.78, 1e4 / 16.78), "CENTIMETER", "16.78"),  # a DICOM converter's placeholder
    ((4e9, 4e9), "CENTIMETER", "2.5e-06"),
])
def test_placeholder_mpp_counts_as_missing(tmp_path, resolution, unit, stated):
    # Such values used to be trusted and refused as "coarser than the target", or tiled at
    # a resolution the slide does not have.
    path = tmp_path / "placeholder.tiff"
    tifffile.imwrite(path, np.full((512, 512, 3), 230, np.uint8), tile=(256, 256),
                     photometric="rgb", resolution=resolution, resolutionunit=unit)
    with pytest.raises(SlideError, match=rf"stated {stated} µm/px looks like a placeholder "
                                         r"\(scanners give 0.05-10\); pass --fill-mpp"):
        open_slide(path)
    with open_slide(path, fill_mpp=0.25) as slide:
        assert slide.info.mpp == 0.25 and slide.info.mpp_source == "fill"


@pytest.mark.parametrize("value, reason", [
    ("0", "stated 0 µm/px looks like a placeholder"),
    ("1000", "stated 1000 µm/px looks like a placeholder"),
    ("nan", "stated nan µm/px looks like a placeholder"),
    ("n/a", "unreadable microns per pixel ('n/a')"),
])
def test_implausible_or_unreadable_stated_mpp_is_no_mpp(value, reason):
    from wsi.slide import _parse_mpp

    mpp, why = _parse_mpp(Path("s.svs"), {"openslide.mpp-x": value})
    assert mpp is None and reason in why
    assert _parse_mpp(Path("s.svs"), {"openslide.mpp-x": "0.2527"}) == (0.2527, "")


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"this is a text file, not a slide\n", "not a slide format"),
    (b"II*\x00" + b"\x00" * 64, "TIFF file that OpenSlide cannot read"),
])
def test_unreadable_files_get_a_one_line_reason(tmp_path, content, reason):
    path = tmp_path / "bad.svs"
    path.write_bytes(content)
    with pytest.raises(SlideError) as err:
        open_slide(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and reason in message and "\n" not in message


def test_truncated_real_slide_is_refused(real_slide, tmp_path):
    path = tmp_path / "truncated.svs"
    path.write_bytes(real_slide.read_bytes()[:1_000_000])
    with pytest.raises(SlideError, match="truncated, corrupt"):
        open_slide(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(SlideError, match="file not found"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(SlideError, match="is a directory"):
        open_slide(tmp_path)


def test_areas_outside_the_scan_read_as_white_glass(real_slide):
    with open_slide(real_slide) as slide:
        region = slide.read_region((2220 - 32, 0), 0, (64, 16))
    assert (region[:, 32:] == 255).all()  # beyond the right edge: transparent in OpenSlide
    assert (region[:, :32] < 255).any()


def test_pen_ink_hues_are_those_of_skimage_rgb2hsv():
    # pen_ink converts only pixels with green above red, with skimage's own arithmetic.
    from skimage import color, morphology

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    rgb[:20] = rgb[:20, :, :1]  # greys
    hsv = color.rgb2hsv(rgb)
    hue = hsv[..., 0] * 360
    expected = ((hue >= 90) & (hue <= 230) & (hsv[..., 1] > 0.15) & (hsv[..., 2] > 0.15))
    expected = morphology.remove_small_objects(expected, max_size=int(100_000 / 8.0**2))
    np.testing.assert_array_equal(pen_ink(rgb, mpp=8.0), expected)


def test_coarse_closing_matches_the_exact_closing():
    # Fine overviews of small slides close on a coarser mask; gaps narrower than the disk
    # still close (also where a crack is thinner than a coarse block), wide ones stay open,
    # and the outline keeps its fine detail.
    from wsi.tissue import _closing, _exact_closing

    mask = np.zeros((600, 800), bool)
    mask[100:500, 100:380] = True
    mask[100:500, 386:700] = True  # a 6-px crack between two halves
    mask[150:450, 420:680] = False  # a hole far wider than the disk
    mask[450:453, 120:300:7] = False  # dents along an edge
    radius = 64.0
    exact, coarse = _exact_closing(mask, radius), _closing(mask, radius)
    assert coarse[110:490, 380:386].all() and not coarse[200:400, 470:630].any()
    assert (exact ^ coarse).sum() < 0.01 * exact.sum()
    assert (mask & ~coarse).sum() == 0


def test_real_slide_mask_barely_moves_with_the_coarse_closing(real_slide, monkeypatch):
    import wsi.tissue as tissue

    with open_slide(real_slide) as slide:
        fast = slide_overview(slide).mask
        monkeypatch.setattr(tissue, "_closing", tissue._exact_closing)
        exact = slide_overview(slide).mask
    assert (fast ^ exact).sum() < 0.01 * exact.sum()  # 0.53% when written

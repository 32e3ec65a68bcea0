"""Fluorescence (dark-field) slides are refused, by their pixels or their metadata, unless the
user allows them; brightfield slides pass."""

from __future__ import annotations

import pytest
from slide_files import dapi_pixels, he_pixels, write_tiff_pyramid

from preprocessing.hospital import preprocess_hospital
from preprocessing.options import TilingOptions
from preprocessing.tile import tile_slide
from wsi.brightfield import fluorescence_reason
from wsi.slide import SlideError, open_slide
from wsi.tissue import overview_mpp, read_overview_rgb


def test_dark_field_slide_is_refused_with_a_one_line_reason(tmp_path):
    path = tmp_path / "dapi.tiff"
    write_tiff_pyramid(path, dapi_pixels())
    with pytest.raises(SlideError, match=r"not a brightfield slide: \d+% of the overview is "
                                         "dark.*--allow-fluorescence") as err:
        tile_slide(path, tmp_path / "dapi.h5", progress=False)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
    assert not (tmp_path / "dapi.h5").exists()


def test_allow_fluorescence_tiles_a_dark_field_slide(tmp_path):
    path = tmp_path / "dapi.tiff"
    write_tiff_pyramid(path, dapi_pixels())
    options = TilingOptions(target_mpp=1.0, patch_size=64, min_tissue=0.05,
                            allow_fluorescence=True)
    assert tile_slide(path, tmp_path / "dapi.h5", options, progress=False).n_patches > 0


def test_metadata_naming_fluorescence_is_refused_even_when_bright(tmp_path):
    path = tmp_path / "said.tiff"
    write_tiff_pyramid(path, he_pixels(), "Illumination=Epi-Fluorescence; Channel=TRITC")
    with open_slide(path) as slide:
        rgb, _ = read_overview_rgb(slide, overview_mpp(slide.info))
        reason = fluorescence_reason(slide.properties, rgb)
    assert reason is not None and reason.startswith("metadata says fluorescence (")
    assert "Epi-Fluorescence" in reason


def test_brightfield_slides_pass(tmp_path, real_slide):
    write_tiff_pyramid(tmp_path / "he.tiff", he_pixels())
    for path in (tmp_path / "he.tiff", real_slide):
        with open_slide(path) as slide:
            rgb, _ = read_overview_rgb(slide, overview_mpp(slide.info))
            assert fluorescence_reason(slide.properties, rgb) is None


def test_preprocess_records_a_fluorescence_slide_as_failed(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_tiff_pyramid(slides / "dapi.tiff", dapi_pixels())
    write_tiff_pyramid(slides / "he.tiff", he_pixels())
    options = TilingOptions(target_mpp=1.0, patch_size=64)
    rows = {r.slide_id: r for r in preprocess_hospital("h", slides, tmp_path / "out", options,
                                                       progress=False)}
    assert rows["he"].status == "ok"
    assert rows["dapi"].status == "failed" and "not a brightfield slide" in rows["dapi"].error
    assert not (tmp_path / "out" / "qc" / "dapi.png").exists()

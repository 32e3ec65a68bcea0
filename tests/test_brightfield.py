"""Fluorescence (dark-field) slides are refused, by their pixels or their metadata, unless the
user allows them; brightfield slides pass."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from preprocessing.hospital import preprocess_hospital
from preprocessing.options import TilingOptions
from preprocessing.tile import tile_slide
from wsi.brightfield import fluorescence_reason
from wsi.slide import SlideError, open_slide
from wsi.tissue import overview_mpp, read_overview_rgb


def _write_pyramid(path, level0: np.ndarray, description: str | None = None) -> None:
    """A two-level tiled TIFF at 0.5 µm/px, as OpenSlide's generic-tiff reads it."""
    resolution = {"resolution": (1e4 / 0.5, 1e4 / 0.5), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tif:
        tif.write(level0, tile=(256, 256), photometric="rgb", compression="jpeg",
                  description=description, metadata=None, **resolution)
        tif.write(level0[::4, ::4], tile=(256, 256), photometric="rgb", compression="jpeg",
                  subfiletype=1)


def _dapi_slide(path) -> None:
    # Black field with blue nuclei (DAPI) and a green cytoplasm stain in a band of "tissue".
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 12, (2048, 2048, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:2048, :2048]
    band = (yy > 600) & (yy < 1400)
    rgb[band & (rng.random((2048, 2048)) < 0.3), 1] = 90
    for cy, cx in rng.integers(0, 2048, (400, 2)):
        if 600 < cy < 1400:
            rgb[max(cy - 8, 0):cy + 8, max(cx - 8, 0):cx + 8] = (20, 30, 220)
    _write_pyramid(path, rgb)


def _he_slide(path, description: str | None = None) -> None:
    rgb = np.full((2048, 2048, 3), 238, np.uint8)
    rgb[500:1500, 500:1500] = (190, 100, 170)
    _write_pyramid(path, rgb, description)


def test_dark_field_slide_is_refused_with_a_one_line_reason(tmp_path):
    path = tmp_path / "dapi.tiff"
    _dapi_slide(path)
    with pytest.raises(SlideError, match=r"not a brightfield slide: \d+% of the overview is "
                                         "dark.*--allow-fluorescence") as err:
        tile_slide(path, tmp_path / "dapi.h5", progress=False)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
    assert not (tmp_path / "dapi.h5").exists()


def test_allow_fluorescence_tiles_a_dark_field_slide(tmp_path):
    path = tmp_path / "dapi.tiff"
    _dapi_slide(path)
    options = TilingOptions(target_mpp=1.0, patch_size=64, min_tissue=0.05,
                            allow_fluorescence=True)
    assert tile_slide(path, tmp_path / "dapi.h5", options, progress=False).n_patches > 0


def test_metadata_naming_fluorescence_is_refused_even_when_bright(tmp_path):
    path = tmp_path / "said.tiff"
    _he_slide(path, description="Illumination=Epi-Fluorescence; Channel=TRITC")
    with open_slide(path) as slide:
        rgb, _ = read_overview_rgb(slide, overview_mpp(slide.info))
        reason = fluorescence_reason(slide.properties, rgb)
    assert reason is not None and reason.startswith("metadata says fluorescence (")
    assert "Epi-Fluorescence" in reason


def test_brightfield_slides_pass(tmp_path, real_slide):
    _he_slide(tmp_path / "he.tiff")
    for path in (tmp_path / "he.tiff", real_slide):
        with open_slide(path) as slide:
            rgb, _ = read_overview_rgb(slide, overview_mpp(slide.info))
            assert fluorescence_reason(slide.properties, rgb) is None


def test_preprocess_records_a_fluorescence_slide_as_failed(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    _dapi_slide(slides / "dapi.tiff")
    _he_slide(slides / "he.tiff")
    options = TilingOptions(target_mpp=1.0, patch_size=64)
    rows = {r.slide_id: r for r in preprocess_hospital("h", slides, tmp_path / "out", options,
                                                       progress=False)}
    assert rows["he"].status == "ok"
    assert rows["dapi"].status == "failed" and "not a brightfield slide" in rows["dapi"].error
    assert not (tmp_path / "out" / "qc" / "dapi.png").exists()

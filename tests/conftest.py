"""Shared fixtures: the real Aperio test slide and small slides written on the fly."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TEST_SLIDE = REPO / ".cache" / "test-slides" / "cmu_small_region.svs"


@pytest.fixture(scope="session")
def real_slide() -> Path:
    """CMU-small-region.svs (Aperio, 2220x2967, 0.499 µm/px, CC0), fetched by `make test`.

    Under CI a missing slide is a failure, not a skip: the real-slide checks must run there.
    """
    path = Path(os.environ.get("SLIDEFED_TEST_SLIDE", DEFAULT_TEST_SLIDE))
    if not path.is_file():
        message = f"real test slide not found at {path}; `make test` fetches it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's headless browser (`make test` installs it), for the results report.

    Under CI a missing browser is a failure, not a skip, like the real slide.
    """
    found = shutil.which(os.environ.get("SLIDEFED_CHROMIUM", "chromium"))
    if found is None:
        message = "chromium not found; `make test` installs it (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return Path(found)


@pytest.fixture(scope="session")
def bag_cohort(tmp_path_factory) -> tuple[Path, list[str]]:
    """Three hospitals of six slides (12 patches of 32 px each, labels 1, 0, 1, ...) written
    by ``slide_bags.write_cohort``; tests must not modify it (copy it first)."""
    from slide_bags import write_cohort

    root = tmp_path_factory.mktemp("bag_cohort")
    return root, write_cohort(root, {"h_a": 6, "h_b": 6, "h_c": 6})


@pytest.fixture(scope="session")
def zeroed_level0(tmp_path_factory):
    """A synthetic slide whose level-0 JPEG tiles are zeroed: the overview (level 1) reads
    fine, the patches (level 0) do not, so the failure happens in the tiling workers. The
    undamaged original is ``good.tiff`` beside it."""
    from damage import zero_tile_data

    from wsi.synthetic import SyntheticSlideSpec, write_synthetic_slide

    out = tmp_path_factory.mktemp("zeroed")
    spec = SyntheticSlideSpec(width=4096, height=2048, mpp=0.5, tumour_regions=0)
    slide = write_synthetic_slide(out / "good.tiff", spec).path
    return zero_tile_data(slide, out / "zeroed.tiff", page=0)

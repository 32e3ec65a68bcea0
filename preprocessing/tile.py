"""One slide to one patch bag: resolution plan, tissue mask, patch grid, labels, run reads, bag.

Patch labels come from the slide's tumour annotation when it has one (the tumour-area
fraction of each patch, source ``annotation``), else from its slide label (every patch gets
it, source ``slide``), else there are none.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from shapely import Polygon
from tqdm import tqdm

from formats.atomic import make_directory, remove_stale_partials
from wsi.annotations import read_tumour_annotation, tumour_fractions
from wsi.bag import (
    BagAttributes,
    BagWriter,
    PatchEncoding,
    PatchGeometry,
    PatchLabels,
    checksum,
)
from wsi.brightfield import fluorescence_reason
from wsi.grid import grid_coords, tissue_fractions
from wsi.patches import max_run_length, read_patch_run, split_runs
from wsi.resolution import ReadPlan, plan_reading
from wsi.slide import Slide, SlideError, open_slide
from wsi.tissue import Overview, slide_overview

from .options import TilingOptions
from .qc import write_qc_picture

log = logging.getLogger(__name__)

# A pool of tiling workers costs ~0.1 s to start and stop (fork, every worker opening the
# slide), what ~30 patches of 256 px take to read and encode, or ~100 of 64 px read at 128 px
# (1 ms each): a worker is started only for this many patches, and this many pixels read, so
# that --workers never makes a slide slower.
MIN_PATCHES_PER_WORKER = 64
MIN_READ_PIXELS_PER_WORKER = 64 * 256 * 256


@dataclass(frozen=True)
class TileResult:
    """What tiling one slide produced."""

    slide_id: str
    bag_path: Path
    n_patches: int
    mpp: float
    mpp_source: str
    read_level: int
    seconds: float


@dataclass(frozen=True)
class SlideLayout:
    """Where a slide's patches are and how they are read, before any pixel is read."""

    plan: ReadPlan
    overview: Overview
    coords: np.ndarray  # row-major level-0 corners of kept patches
    tissue: np.ndarray
    runs: list[slice]


def plan_layout(slide: Slide, options: TilingOptions) -> SlideLayout:
    """Resolution plan, tissue mask and the kept patches of ``slide``, row by row.

    Raises :class:`SlideError` for a fluorescence slide unless ``options`` allow them."""
    info = slide.info
    plan = plan_reading(info, options.target_mpp, options.patch_size)
    overview = slide_overview(slide)
    if not options.allow_fluorescence and (
            reason := fluorescence_reason(slide.properties, overview.rgb)):
        raise SlideError(info.path, f"not a brightfield slide: {reason}; pass "
                                    "--allow-fluorescence to tile it anyway")
    coords = grid_coords(info.width, info.height, plan.step_level0)
    tissue = tissue_fractions(overview.mask, overview.downsample, coords, plan.step_level0)
    keep = tissue >= options.min_tissue
    coords, tissue = coords[keep], tissue[keep]
    return SlideLayout(plan, overview, coords, tissue,
                       split_runs(coords, plan.step_level0, max_run_length(plan)))


def patch_labels(slide_id: str, layout: SlideLayout, threshold: float,
                 tumour: list[Polygon] | None, slide_label: int | None) -> PatchLabels | None:
    """Labels of the kept patches: the fraction of each covered by the ``tumour`` polygons of
    an annotation when there is one, else ``slide_label`` for every patch, else None."""
    n = len(layout.coords)
    if tumour is None:
        if slide_label is None:
            return None
        return PatchLabels(np.full(n, slide_label, np.float32), "slide", threshold)
    labels = PatchLabels(tumour_fractions(tumour, layout.coords, layout.plan.step_level0),
                         "annotation", threshold)
    n_tumour = int(labels.tumour.sum())
    log.info("%s: %d of %d patches are tumour (fraction >= %g)", slide_id, n_tumour, n,
             threshold)
    if slide_label == 0 and n_tumour:
        log.warning("%s: slide label is 0 but %d patches are annotated tumour", slide_id,
                    n_tumour)
    return labels


def _encode_run(slide: Slide, plan: ReadPlan, coords: np.ndarray,
                encoding: PatchEncoding) -> tuple[list[bytes], list[int]]:
    chunks = [encoding.encode(p) for p in read_patch_run(slide, plan, coords)]
    return chunks, [checksum(c) for c in chunks]


# Worker-process state for parallel tiling of one slide: each worker opens the slide once.
_worker_slide: Slide | None = None


def _worker_open(path: Path, options: TilingOptions) -> None:
    global _worker_slide
    _worker_slide = open_slide(path, options.fill_mpp, options.override_mpp)


def _worker_encode(args: tuple[ReadPlan, np.ndarray, PatchEncoding, int],
                   ) -> tuple[int, tuple[list[bytes], list[int]]]:
    plan, coords, encoding, start = args
    assert _worker_slide is not None
    return start, _encode_run(_worker_slide, plan, coords, encoding)


def _encoded_runs(slide: Slide, layout: SlideLayout, options: TilingOptions, workers: int,
                  ) -> Iterator[tuple[int, tuple[list[bytes], list[int]]]]:
    encoding = options.encoding
    if workers <= 1:
        for run in layout.runs:
            yield run.start, _encode_run(slide, layout.plan, layout.coords[run], encoding)
        return
    tasks = [(layout.plan, layout.coords[r], encoding, r.start) for r in layout.runs]
    # fork: workers start in milliseconds and inherit nothing heavier than numpy and OpenSlide.
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=_worker_open,
                  initargs=(slide.info.path, options)) as pool:
        yield from pool.imap_unordered(_worker_encode, tasks)


def tiling_workers(n_patches: int, read_size: int, workers: int) -> int:
    """Processes worth using for a slide of ``n_patches`` read at ``read_size`` px: at most
    ``workers``, each with at least :data:`MIN_PATCHES_PER_WORKER` patches and
    :data:`MIN_READ_PIXELS_PER_WORKER` pixels to read, and 1 (no pool) for small slides."""
    per_worker = max(MIN_PATCHES_PER_WORKER, -(-MIN_READ_PIXELS_PER_WORKER // read_size**2))
    return max(1, min(workers, n_patches // per_worker))


def tile_slide(slide_path: str | Path, bag_path: str | Path,
               options: TilingOptions | None = None, *, slide_id: str | None = None,
               workers: int = 1, qc_path: str | Path | None = None,
               annotation: str | Path | None = None, slide_label: int | None = None,
               progress: bool = True) -> TileResult:
    """Cut the tissue of ``slide_path`` into patches and write them to the bag ``bag_path``.

    ``annotation`` (GeoJSON tumour polygons, level-0 px) or else ``slide_label`` (0 or 1)
    gives the patches their labels. ``workers`` processes read and encode patches, fewer when
    the slide has too few patches to repay them (:func:`tiling_workers`). Raises
    :class:`~wsi.slide.SlideError` naming the slide when it cannot be used or holds no tissue
    patch, and
    :class:`~wsi.annotations.AnnotationError` naming the annotation when that is unusable.
    The bag appears only when complete, and the QC picture (overview, tissue mask, kept
    patches) at ``qc_path``, when given, only with it: a slide that fails has neither.
    """
    started = time.perf_counter()
    options = options or TilingOptions()
    slide_path, bag_path = Path(slide_path), Path(bag_path)
    if slide_label not in (None, 0, 1):
        raise SlideError(slide_path, f"slide label must be 0 or 1, got {slide_label!r}")
    slide_id = slide_id or slide_path.stem
    make_directory(bag_path.parent)
    for stale in remove_stale_partials(bag_path):
        log.info("removed %s left by an interrupted run", stale)
    with open_slide(slide_path, options.fill_mpp, options.override_mpp) as slide:
        info = slide.info
        # Before any pixel is read, so that a bad annotation fails in milliseconds.
        tumour = None if annotation is None else read_tumour_annotation(
            annotation, options.annotation_rules, extent=(info.width, info.height))
        layout = plan_layout(slide, options)
        n = len(layout.coords)
        log.info("%s: %s, %d levels, %dx%d px at %.4g µm/px (%s); reading level %d, %d patches",
                 slide_id, info.vendor, info.level_count, info.width, info.height, info.mpp,
                 info.mpp_source, layout.plan.read_level, n)
        if n == 0:
            raise SlideError(slide_path, f"no patch has tissue fraction >= {options.min_tissue}")
        labels = patch_labels(slide_id, layout, options.tumour_threshold, tumour, slide_label)
        if (used := tiling_workers(n, layout.plan.read_size, workers)) < workers:
            log.debug("%s: %d patches, tiled by %d process(es) rather than %d", slide_id, n,
                      used, workers)
        attributes = BagAttributes(
            slide_id=slide_id, source_path=os.path.abspath(slide_path), mpp_level0=info.mpp,
            mpp_source=info.mpp_source, target_mpp=options.target_mpp,
            read_level=layout.plan.read_level, level0_width=info.width,
            level0_height=info.height, vendor=info.vendor)
        geometry = PatchGeometry(options.patch_size, layout.plan.read_size,
                                 layout.plan.step_level0)
        with BagWriter(bag_path, attributes, geometry, layout.coords, layout.tissue,
                       options.encoding, labels) as writer, \
                tqdm(total=n, unit="patch", desc=slide_id, disable=None if progress else True,
                     leave=False) as bar:
            for start, (chunks, checksums) in _encoded_runs(slide, layout, options, used):
                writer.write_chunks(start, chunks, checksums)
                bar.update(len(chunks))
    if qc_path is not None:
        try:
            write_qc_picture(qc_path, layout.overview, layout.coords, layout.plan.step_level0)
        except BaseException:
            bag_path.unlink(missing_ok=True)  # a slide's bag and picture exist together
            raise
    return TileResult(slide_id=slide_id, bag_path=bag_path, n_patches=n, mpp=info.mpp,
                      mpp_source=info.mpp_source, read_level=layout.plan.read_level,
                      seconds=time.perf_counter() - started)

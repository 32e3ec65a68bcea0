"""Tiling benchmark: ``slidefed tile`` against bare OpenSlide reads of the same patches.

Both sides run in the same invocation, each in a fresh forked process (so peak memory is
per pass) after one untimed read of the file (so both find it in the OS page cache). The
baseline is one ``read_region`` call per patch at the same level and size, converted to a
NumPy array, and nothing else; ``slidefed tile`` additionally finds tissue, resizes when
needed, compresses and writes the bag. The per-slide overhead is what a slide costs before and
after its patches, whatever their number: opening it, its overview and tissue mask, the patch
grid, and the QC picture that ``preprocess`` writes of every slide.
"""

from __future__ import annotations

import resource
import tempfile
import time
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import openslide

from preprocessing.isolation import run_isolated
from preprocessing.qc import write_qc_picture
from preprocessing.tile import TilingOptions, plan_layout, tile_slide, tiling_workers
from wsi.bag import CODECS, PatchEncoding
from wsi.patches import read_patch_run
from wsi.slide import open_slide

# Levels compared besides each encoding's default.
ENCODING_LEVELS_TO_COMPARE = {"jpeg": (80, 95), "deflate": (6,)}


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB.

    Linux's VmHWM belongs to the current address space; ``ru_maxrss`` is kept across
    ``execve`` and would report a large parent's peak for a small child.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_fresh_process(fn, *args):
    """Run ``fn(*args)`` in a forked child; return its result and the child's peak RSS (MB)."""

    def measured(_: None):
        result = fn(*args)
        return result, peak_rss_mb()

    [(_, outcome)] = list(run_isolated(measured, [None]))
    if outcome.result is None:
        raise RuntimeError(outcome.error)
    return outcome.result


def _bare_reads(slide_path: Path, coords: np.ndarray, level: int, size: int) -> float:
    started = time.perf_counter()
    osr = openslide.OpenSlide(slide_path)
    for x, y in coords.tolist():
        np.asarray(osr.read_region((x, y), level, (size, size)))
    osr.close()
    return time.perf_counter() - started


def _overhead(slide_path: Path, qc: Path, options: TilingOptions) -> tuple[float, float]:
    """Seconds to open ``slide_path`` and lay out its patches, and to write its QC picture."""
    started = time.perf_counter()
    with open_slide(slide_path, options.fill_mpp, options.override_mpp) as slide:
        layout = plan_layout(slide, options)
    laid_out = time.perf_counter()
    write_qc_picture(qc, layout.overview, layout.coords, layout.plan.step_level0)
    return laid_out - started, time.perf_counter() - laid_out


def _tile(slide_path: Path, bag: Path, options: TilingOptions, workers: int) -> float:
    started = time.perf_counter()
    tile_slide(slide_path, bag, options, workers=workers, progress=False)
    return time.perf_counter() - started


def bench_tiling(slide_path: str | Path, options: TilingOptions | None = None,
                 workers: int = 2) -> dict:
    """Measure tiling throughput, its ratio to bare reads, the per-slide overhead, the speed-up
    with ``workers`` processes (as many as the slide's patches repay), peak RSS and bytes per
    stored patch. Returns one flat dict."""
    slide_path = Path(slide_path)
    options = options or TilingOptions()
    with open_slide(slide_path, options.fill_mpp, options.override_mpp) as slide:
        info = slide.info
        layout = plan_layout(slide, options)
    n = len(layout.coords)
    with slide_path.open("rb") as f:  # warm the page cache for both sides alike
        while f.read(1 << 24):
            pass
    bare_s, bare_rss = _in_fresh_process(_bare_reads, slide_path, layout.coords,
                                         layout.plan.read_level, layout.plan.read_size)
    with tempfile.TemporaryDirectory() as tmp:
        bag = Path(tmp) / "bench.h5"
        tile_s, tile_rss = _in_fresh_process(_tile, slide_path, bag, options, 1)
        bag_bytes = bag.stat().st_size
        (layout_s, qc_s), _ = _in_fresh_process(_overhead, slide_path, Path(tmp) / "qc.png",
                                                options)
        parallel_s, parallel_rss = _in_fresh_process(
            partial(_tile, slide_path, Path(tmp) / "bench_parallel.h5", options), workers)
    return {
        "slide": str(slide_path),
        "level0_size": [info.width, info.height],
        "vendor": info.vendor,
        "read_level": layout.plan.read_level,
        "read_size": layout.plan.read_size,
        "patch_size": options.patch_size,
        "n_patches": n,
        "bare_read_region_patches_per_s": round(n / bare_s, 1),
        "tile_patches_per_s": round(n / tile_s, 1),
        "ratio_tile_vs_bare": round(bare_s / tile_s, 3),
        "per_slide_overhead_s": round(layout_s + qc_s, 3),
        "overhead_layout_s": round(layout_s, 3),
        "overhead_qc_s": round(qc_s, 3),
        "workers": workers,
        "workers_used": tiling_workers(n, layout.plan.read_size, workers),
        "tile_patches_per_s_parallel": round(n / parallel_s, 1),
        "speedup_parallel": round(tile_s / parallel_s, 3),
        "peak_rss_mb_tile": round(tile_rss, 1),
        "peak_rss_mb_bare": round(bare_rss, 1),
        "peak_rss_mb_parallel_main": round(parallel_rss, 1),
        "bytes_per_patch": round(bag_bytes / max(n, 1)),
        "raw_bytes_per_patch": options.patch_size ** 2 * 3,
    }


def bench_encodings(slide_path: str | Path, options: TilingOptions | None = None,
                    sample: int = 64) -> list[dict]:
    """Size, encode and decode time and pixel error of every patch encoding on one slide's
    tissue patches (up to ``sample`` of them, read losslessly first)."""
    options = options or TilingOptions()
    with open_slide(slide_path, options.fill_mpp, options.override_mpp) as slide:
        layout = plan_layout(slide, options)
        picked = np.linspace(0, len(layout.coords) - 1, min(sample, len(layout.coords)))
        coords = layout.coords[np.unique(picked.astype(int))]
        patches = np.concatenate([read_patch_run(slide, layout.plan, coords[i:i + 1])
                                  for i in range(len(coords))])
    rows = []
    for name, codec in CODECS.items():
        for level in sorted({codec.default_level, *ENCODING_LEVELS_TO_COMPARE[name]}):
            encoding = PatchEncoding(name, level)
            started = time.perf_counter()
            encoded = [encoding.encode(p) for p in patches]
            encode_s = time.perf_counter() - started
            with tempfile.TemporaryDirectory() as tmp, h5py.File(Path(tmp) / "e.h5", "w") as f:
                ds = codec.create(f, len(encoded), options.patch_size, level)
                codec.write(ds, 0, encoded)
                started = time.perf_counter()
                decoded = np.stack([codec.decode(codec.stored(ds, i), options.patch_size)
                                    for i in range(len(encoded))]).astype(np.float64)
                decode_s = time.perf_counter() - started
            error = decoded - patches
            mse = float((error ** 2).mean())
            rows.append({
                "encoding": name, "level": level,
                "bytes_per_patch": round(float(np.mean([len(e) for e in encoded]))),
                "size_ratio_vs_raw": round(patches[0].nbytes / np.mean([len(e) for e in encoded]),
                                           2),
                "encode_ms": round(encode_s / len(patches) * 1e3, 3),
                "decode_ms": round(decode_s / len(patches) * 1e3, 3),
                "mean_abs_error": round(float(np.abs(error).mean()), 3),
                "psnr_db": None if mse == 0 else round(10 * np.log10(255 ** 2 / mse), 1),
                "default": encoding == PatchEncoding(),
            })
    return rows

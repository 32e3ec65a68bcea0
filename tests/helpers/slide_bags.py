"""A tiny cohort of patch bags for engine tests, written with h5py in the documented layout.

Each hospital's directory looks like ``slidefed preprocess`` output (``manifest.csv``,
``bags/<slide_id>.h5``). Patches are small RGB squares: normal tissue pink, tumour patches
with dark-violet blobs, so a small CNN tells them apart within a few rounds. Bags follow
format version 2 (annotation labels and CRC-32 checksums) unless ``version=1``.
"""

from __future__ import annotations

import csv
import io
import zlib
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from federation_synthetic import OPTED_IN_REPORT, with_overrides
from PIL import Image

from federation.data.bags import BagIndex, index_bag
from federation.data.slides import read_manifest
from formats.hospital_dir import MANIFEST_COLUMNS


def synthetic_patches(rng: np.random.Generator, tumour: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``(N, size, size, 3)``: pink background, dark blobs on tumour patches."""
    n = len(tumour)
    base = np.array([225, 170, 200], np.float64)
    patches = base + rng.normal(0, 12, (n, size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    for i in np.flatnonzero(tumour):
        for _ in range(4):
            cx, cy, r = rng.uniform(0, size), rng.uniform(0, size), size / 6
            blob = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            patches[i][blob] = [90, 50, 140]
    return np.clip(patches, 0, 255).astype(np.uint8)


def write_bag(path: Path, slide_id: str, patches: np.ndarray, *, tumour_fraction: np.ndarray |
              None = None, version: int = 2, target_mpp: float = 1.0,
              **attrs: Any) -> Path:
    """A JPEG-encoded bag of ``patches`` (uint8 ``(N, P, P, 3)``)."""
    n, size = len(patches), patches.shape[1]
    encoded = []
    for patch in patches:
        buffer = io.BytesIO()
        Image.fromarray(patch).save(buffer, format="JPEG", quality=90, subsampling="4:4:4")
        encoded.append(np.frombuffer(buffer.getvalue(), np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs.update({"format": "slidefed-bag", "format_version": version,
                        "slide_id": slide_id, "source_path": f"/slides/{slide_id}.tiff",
                        "mpp_level0": 0.25, "target_mpp": target_mpp, "read_level": 2,
                        "level0_width": 4 * size * n, "level0_height": 4 * size,
                        "vendor": "generic-tiff", "slidefed_version": "test", **attrs})
        coords = np.stack([np.arange(n) * 4 * size, np.zeros(n, np.int64)], axis=1)
        ds = f.create_dataset("coords", data=coords.astype(np.int64))
        ds.attrs.update({"patch_level": 2, "patch_size": size, "patch_size_level0": 4 * size})
        f.create_dataset("tissue_fraction", data=np.ones(n, np.float32))
        ds = f.create_dataset("patches", shape=(n,), dtype=h5py.vlen_dtype(np.uint8))
        for i, data in enumerate(encoded):
            ds[i] = data
        ds.attrs.update({"encoding": "jpeg", "encoding_level": 90, "patch_size": size,
                         "color": "RGB"})
        if version >= 2:
            f.create_dataset("checksums", data=np.array([zlib.crc32(e.tobytes())
                                                         for e in encoded], np.uint32))
            if tumour_fraction is not None:
                labels = f.create_dataset("labels", data=tumour_fraction.astype(np.float32))
                labels.attrs.update({"source": "annotation", "threshold": 0.5})
    return path


def write_cohort(root: Path, hospitals: dict[str, int], *, patches: int = 12, size: int = 32,
                 seed: int = 0, version: int = 2) -> list[str]:
    """``hospitals``: name -> number of slides (alternating labels 1, 0, ...). Returns the
    hospital names."""
    rng = np.random.default_rng(seed)
    for hospital, count in hospitals.items():
        directory = root / hospital
        rows = []
        for s in range(count):
            slide_id = f"{hospital}_{s:03d}"
            label = 1 - s % 2
            tumour = np.zeros(patches, bool)
            if label:
                tumour[rng.choice(patches, size=max(1, patches // 3), replace=False)] = True
            pixels = synthetic_patches(rng, tumour, size)
            write_bag(directory / "bags" / f"{slide_id}.h5", slide_id, pixels,
                      tumour_fraction=tumour.astype(np.float32), version=version)
            rows.append({"slide_id": slide_id, "path": f"/slides/{slide_id}.tiff",
                         "label": label, "status": "ok", "n_patches": patches, "mpp": 0.25,
                         "error": ""})
        with (directory / "manifest.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS, restval="")
            writer.writeheader()
            writer.writerows(rows)
    return list(hospitals)


def slide_config(root: Path, output_dir: Path, hospitals: list[str], **overrides: Any
                 ) -> dict[str, Any]:
    """A config dict for a fast slide-level run on ``write_cohort``'s bags."""
    config: dict[str, Any] = {
        "algorithm": "proxyfl", "rounds": 3, "seed": 0, "clients": len(hospitals),
        "backend": "local", "threads": 1, "output_dir": str(output_dir),
        "checkpoint_every": 2,
        "data": {"name": "bags", "root": str(root), "hospitals": hospitals},
        "model": {"private": "cnn1", "proxy": "cnn1"},
        "optim": {"batch_size": 2, "lr": 0.01},
        "dp": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-3},
        "slides": {"target_mpp": 1.0, "patch_size": 32, "patches_per_slide": 4, "top_k": 2,
                   "validation_fraction": 0.25, "test_fraction": 0.25},
        "report": dict(OPTED_IN_REPORT),  # the tests read the run-level metrics and times
    }
    return with_overrides(config, overrides)


def index_cohort(root: Path, hospital: str) -> list[BagIndex]:
    """``BagIndex`` of every slide of ``hospital`` in a ``write_cohort`` directory, in
    manifest order (engine tests that build client data without a config)."""
    return [index_bag(path, label) for _, label, path in read_manifest(root / hospital)]

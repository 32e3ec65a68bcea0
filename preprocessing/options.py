"""Tiling options, kept apart from the tiler so the command line can read them cheaply."""

from __future__ import annotations

from dataclasses import dataclass

from wsi.bag import PatchEncoding


@dataclass(frozen=True)
class TilingOptions:
    """How slides are cut into patches; the same for every slide of a cohort."""

    target_mpp: float = 0.5
    patch_size: int = 256
    min_tissue: float = 0.5
    slide_mpp: float | None = None
    encoding: PatchEncoding = PatchEncoding()

    def __post_init__(self) -> None:
        if not self.target_mpp > 0:
            raise ValueError(f"target mpp must be positive, got {self.target_mpp}")
        if not 16 <= self.patch_size <= 4096:
            raise ValueError(f"patch size must be between 16 and 4096 px, got {self.patch_size}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(f"min tissue must be a fraction in [0, 1], got {self.min_tissue}")
        if self.slide_mpp is not None and not self.slide_mpp > 0:
            raise ValueError(f"slide mpp must be positive, got {self.slide_mpp}")

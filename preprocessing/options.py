"""Tiling options, kept apart from the tiler so the command line can read them cheaply."""

from __future__ import annotations

from dataclasses import dataclass

from wsi.annotations import AnnotationRules
from wsi.bag import PatchEncoding

# A patch counts as tumour when at least half its area is: its binary label then agrees with
# the majority of its pixels, which minimises the area labelled wrongly. The fraction itself
# is stored, so a reader can choose another threshold without re-tiling.
DEFAULT_TUMOUR_THRESHOLD = 0.5


@dataclass(frozen=True)
class TilingOptions:
    """How slides are cut into patches and labelled; the same for every slide of a cohort."""

    target_mpp: float = 0.5
    patch_size: int = 256
    min_tissue: float = 0.5
    fill_mpp: float | None = None  # level-0 µm/px of slides whose files state none
    override_mpp: float | None = None  # level-0 µm/px replacing what every file states
    encoding: PatchEncoding = PatchEncoding()
    tumour_threshold: float = DEFAULT_TUMOUR_THRESHOLD
    annotation_rules: AnnotationRules = AnnotationRules()
    allow_fluorescence: bool = False  # tile dark-field slides instead of refusing them

    def __post_init__(self) -> None:
        if not self.target_mpp > 0:
            raise ValueError(f"target mpp must be positive, got {self.target_mpp}")
        if not 16 <= self.patch_size <= 4096:
            raise ValueError(f"patch size must be between 16 and 4096 px, got {self.patch_size}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(f"min tissue must be a fraction in [0, 1], got {self.min_tissue}")
        for name, value in (("fill", self.fill_mpp), ("override", self.override_mpp)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} mpp must be positive, got {value}")
        if self.fill_mpp is not None and self.override_mpp is not None:
            raise ValueError("fill mpp and override mpp exclude each other: an override "
                             "applies to every slide")
        if not 0.0 < self.tumour_threshold <= 1.0:
            raise ValueError(f"tumour threshold must be in (0, 1], got {self.tumour_threshold}")

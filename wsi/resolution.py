"""Choose how to read patches at a target resolution given in µm per pixel.

Magnification labels ("20×") mean different things on different scanners; µm per pixel does
not. The plan reads from the coarsest pyramid level that is at least as fine as the target,
so detail is never invented, and resizes only when that level is not already the target.
"""

from __future__ import annotations

from dataclasses import dataclass

from .slide import SlideError, SlideInfo

# A level within this relative distance of the target counts as the target (no resize):
# scanners state mpp such as 0.2527 for a nominal 0.25.
MPP_TOLERANCE = 0.05


@dataclass(frozen=True)
class ReadPlan:
    """How patches of ``patch_size`` px at ``target_mpp`` are read from a slide."""

    target_mpp: float
    patch_size: int
    read_level: int
    read_size: int  # side of a patch in pixels at read_level
    step_level0: int  # side of a patch in level-0 pixels (the grid step)

    @property
    def needs_resize(self) -> bool:
        return self.read_size != self.patch_size


def plan_reading(info: SlideInfo, target_mpp: float, patch_size: int) -> ReadPlan:
    """Plan reads of ``patch_size``-px patches at ``target_mpp`` µm/px from the slide ``info``.

    Raises :class:`SlideError` when the slide's finest level is coarser than the target, or
    when one patch would not fit in the slide.
    """
    if not target_mpp > 0:
        raise SlideError(info.path, f"target resolution must be positive, got {target_mpp} µm/px")
    if patch_size < 1:
        raise SlideError(info.path, f"patch size must be positive, got {patch_size}")
    fine_enough = [
        level for level in range(info.level_count)
        if info.level_mpp(level) <= target_mpp * (1 + MPP_TOLERANCE)
    ]
    if not fine_enough:
        raise SlideError(info.path, f"finest level is {info.mpp:.4g} µm/px, coarser than the "
                                    f"requested {target_mpp:g} µm/px")
    level = max(fine_enough, key=info.level_mpp)
    level_mpp = info.level_mpp(level)
    if abs(level_mpp - target_mpp) <= MPP_TOLERANCE * target_mpp:
        read_size = patch_size
    else:
        read_size = round(patch_size * target_mpp / level_mpp)
    step_level0 = round(read_size * info.level_downsamples[level])
    if step_level0 > min(info.width, info.height):
        raise SlideError(info.path, f"slide ({info.width}x{info.height} px) is smaller than one "
                                    f"{patch_size}-px patch at {target_mpp:g} µm/px")
    return ReadPlan(target_mpp=target_mpp, patch_size=patch_size, read_level=level,
                    read_size=read_size, step_level0=step_level0)

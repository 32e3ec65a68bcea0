"""Tell brightfield slides (stained tissue on white glass) from fluorescence (dark-field) ones.

The tissue mask looks for colour on a bright background, as H&E and IHC scans have it. A
fluorescence scan (DAPI, FITC, TRITC, ...) shows its signal on a black field, and would be
cut into patches of the whole dark field. So a slide is refused when its file says it is
fluorescence, or when most of its overview is dark: on a brightfield scan even dense
hematoxylin keeps a channel above :data:`DARK_VALUE`, and glass is near white.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# A pixel whose brightest channel is below this (of 255) is dark.
DARK_VALUE = 51
# A slide with more than this fraction of its overview dark is dark-field.
MAX_DARK_FRACTION = 0.5
# Metadata values longer than this are cut in the reason, to keep it one short line.
_QUOTE_CHARS = 60


def dark_fraction(rgb: np.ndarray) -> float:
    """Fraction of the pixels of an RGB overview whose brightest channel is dark."""
    brightest = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    return float((brightest < DARK_VALUE).mean())


def fluorescence_reason(properties: Mapping[str, str], rgb: np.ndarray) -> str | None:
    """Why a slide with these OpenSlide ``properties`` and overview ``rgb`` is not brightfield
    (its metadata names fluorescence, or its overview is mostly dark), or None if it is."""
    for key, value in properties.items():
        if "fluorescen" in value.lower():
            quoted = value if len(value) <= _QUOTE_CHARS else value[:_QUOTE_CHARS] + "..."
            return f"metadata says fluorescence ({key}={' '.join(quoted.split())!r})"
    dark = dark_fraction(rgb)
    if dark > MAX_DARK_FRACTION:
        return (f"{dark:.0%} of the overview is dark (brightfield glass is bright): a "
                "fluorescence or other dark-field scan")
    return None

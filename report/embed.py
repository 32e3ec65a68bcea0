"""Pictures as ``data:`` URIs, so the report is one file that needs no other."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image

from report.collect import ReportInputError

JPEG_QUALITY = 85


def data_uri(data: bytes, mime: str = "image/png") -> str:
    """``data`` as a base64 ``data:`` URI."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def picture_uri(path: Path, max_side: int) -> str:
    """The picture at ``path``, shrunk to at most ``max_side`` px, as a JPEG ``data:`` URI
    (QC pictures and heatmaps are ~1600 px PNGs of a few hundred kB; the report shows them
    smaller)."""
    try:
        with Image.open(path) as image:
            picture = image.convert("RGB")
    except OSError as error:
        raise ReportInputError(f"{path}: unreadable picture ({error})") from None
    picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return data_uri(buffer.getvalue(), "image/jpeg")

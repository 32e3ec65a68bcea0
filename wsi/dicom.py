"""DICOM-WSI slides: which files make up which slide, read from their headers only.

A DICOM whole-slide image is a series of instances (one per pyramid level, plus label and
overview images), usually one file each. OpenSlide opens the slide from any one instance
and gathers the others of the same SeriesInstanceUID from that file's folder, silently
leaving out files it cannot use. So that a missing or damaged file fails its slide instead
of shrinking it, the instances are read here first: pydicom parses each header and stops
before the pixel data, whose end is checked to see that the file is whole.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, VLWholeSlideMicroscopyImageStorage

from .slide import SlideError

_HEADER_TAGS = ["SeriesInstanceUID", "ContainerIdentifier", "ImageType",
                "TotalPixelMatrixColumns", "TotalPixelMatrixRows", "NumberOfFrames"]
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
_ITEM, _SEQUENCE_END = 0xE000FFFE, 0xE0DDFFFE  # (FFFE,E000), (FFFE,E0DD) read as LE uint32
_SEQUENCE_END_ITEM = struct.pack("<II", _SEQUENCE_END, 0)  # how encapsulated pixel data ends


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` starts as a DICOM Part 10 file does ("DICM" after a 128-byte
    preamble), whatever its name: PACS exports often name files by UID, without ``.dcm``."""
    try:
        with path.open("rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


@dataclass(frozen=True)
class DicomInstance:
    """One DICOM file, as far as grouping it into a slide needs."""

    path: Path
    sop_class: UID
    series_uid: str = ""
    container_id: str = ""  # the glass slide's identifier (barcode), as the scanner wrote it
    image_type: tuple[str, ...] = ()
    width: int = 0  # TotalPixelMatrixColumns
    height: int = 0
    damage: str = ""  # why the file cannot be read whole (a truncated copy), if it cannot

    @property
    def is_wsi(self) -> bool:
        return self.sop_class == VLWholeSlideMicroscopyImageStorage

    @property
    def is_level(self) -> bool:
        """A pyramid level (not a label, overview or thumbnail)."""
        return self.image_type[2:3] == ("VOLUME",)

    @property
    def is_full_resolution(self) -> bool:
        """A pyramid level as scanned; the others are ``RESAMPLED`` from it."""
        return self.image_type[2:4] == ("VOLUME", "NONE")


def read_instance(path: Path) -> DicomInstance:
    """The header of the DICOM file ``path``, and for a whole-slide image whether the file is
    whole; :class:`SlideError` when the header is unreadable (its series is then unknown)."""
    try:
        with path.open("rb") as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            sop_class = UID(ds.file_meta.get("MediaStorageSOPClassUID", ""))
            if sop_class != VLWholeSlideMicroscopyImageStorage:
                return DicomInstance(path, sop_class)
            if not ds.get("SeriesInstanceUID"):
                raise SlideError(path, "DICOM whole-slide image without a SeriesInstanceUID")
            damage = _pixel_data_damage(path, f, ds.file_meta.TransferSyntaxUID,
                                        int(ds.get("NumberOfFrames", 1)))
    except SlideError:
        raise
    except (InvalidDicomError, OSError, EOFError, ValueError, struct.error) as exc:
        raise SlideError(path, f"unreadable DICOM file ({exc})") from exc
    return DicomInstance(path, sop_class, str(ds.SeriesInstanceUID),
                         str(ds.get("ContainerIdentifier", "")),
                         tuple(str(v) for v in ds.get("ImageType", ())),
                         int(ds.get("TotalPixelMatrixColumns", 0)),
                         int(ds.get("TotalPixelMatrixRows", 0)), damage)


def _pixel_data_damage(path: Path, f: BinaryIO, syntax: UID, frames: int) -> str:
    """Why the pixel data that ``f`` is positioned at does not end within the file (empty
    if it does): encapsulated frames are items closed by a sequence delimiter, native pixels
    have a length. A copy cut short, the usual incomplete series, shows here. A file that
    ends with the delimiter is taken as whole without walking its items (0.4 s for 80,000
    frames)."""
    size = path.stat().st_size
    head = f.read(12)
    if head[:4] != _PIXEL_DATA_TAG:
        return "has no pixel data"
    (length,) = struct.unpack("<I", head[8:12])
    if not syntax.is_encapsulated:
        missing = f.tell() + length - size
        return f"is truncated: {missing} bytes of its pixel data are missing" if missing > 0 else ""
    start = f.tell()
    f.seek(size - 8)
    if f.read(8) == _SEQUENCE_END_ITEM:  # as a whole file ends; walk the items otherwise
        return ""
    f.seek(start)
    items = 0
    while len(item := f.read(8)) == 8:
        tag, length = struct.unpack("<II", item)
        if tag == _SEQUENCE_END:
            return ""
        if tag != _ITEM or f.tell() + length > size:
            break
        f.seek(length, 1)
        items += 1
    return f"is truncated: it holds {max(items - 1, 0)} of its {frames} frames"


def series_error(instances: list[DicomInstance]) -> str | None:
    """Why the whole-slide ``instances`` of one series do not make a whole slide, as one line
    ``<file>: <reason>`` naming the damaged file (or the slide's own), or None if they do."""
    for instance in instances:
        if instance.damage:
            return (f"{instance.path}: DICOM file {instance.damage} (series "
                    f"{instance.series_uid}); copy it again")
    widest = level0_instance(instances)
    if not widest.is_level:
        kinds = sorted({"/".join(i.image_type) or "no ImageType" for i in instances})
        return (f"{widest.path}: incomplete DICOM series {widest.series_uid}: no pyramid image "
                f"among its {len(instances)} files ({', '.join(kinds)})")
    if not widest.is_full_resolution:
        return (f"{widest.path}: incomplete DICOM series {widest.series_uid}: the "
                f"full-resolution image is missing (the largest of its {len(instances)} files "
                f"is a {'/'.join(widest.image_type[3:])} level of {widest.width}x"
                f"{widest.height} px); copy the whole series")
    return None


def level0_instance(instances: list[DicomInstance]) -> DicomInstance:
    """The instance to open the slide by: its widest pyramid level (any one instance would
    do for OpenSlide; this one is the slide's level 0 when the series is complete)."""
    return max(instances, key=lambda i: (i.is_level, i.width, str(i.path)))

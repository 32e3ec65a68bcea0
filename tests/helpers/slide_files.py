"""Slide files that wsi/synthetic.py does not write, made by the tests that need them (no
downloads): small brightfield and fluorescence pyramids as generic TIFF, and DICOM-WSI series.

A DICOM series is one file per pyramid level, as converters write them: a VL Whole Slide
Microscopy Image instance, TILED_FULL, JPEG baseline frames (YBR_FULL_422), the level-0 pixel
spacing in the shared functional groups (which OpenSlide reports as ``openslide.mpp-x``/``-y``).
Level 0 is ``ORIGINAL\\PRIMARY\\VOLUME\\NONE`` and the others
``DERIVED\\PRIMARY\\VOLUME\\RESAMPLED``, the image types OpenSlide's DICOM driver accepts as
pyramid levels.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    VLWholeSlideMicroscopyImageStorage,
    generate_uid,
)


def he_pixels() -> np.ndarray:
    """2048x2048 px of glass with a 1000 px square of H&E-pink tissue."""
    rgb = np.full((2048, 2048, 3), 238, np.uint8)
    rgb[500:1500, 500:1500] = (190, 100, 170)
    return rgb


def dapi_pixels() -> np.ndarray:
    """2048x2048 px of a fluorescence scan: a black field with blue nuclei (DAPI) and a green
    cytoplasm stain in a band of "tissue"."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 12, (2048, 2048, 3)).astype(np.uint8)
    yy, _ = np.mgrid[:2048, :2048]
    band = (yy > 600) & (yy < 1400)
    rgb[band & (rng.random((2048, 2048)) < 0.3), 1] = 90
    for cy, cx in rng.integers(0, 2048, (400, 2)):
        if 600 < cy < 1400:
            rgb[max(cy - 8, 0):cy + 8, max(cx - 8, 0):cx + 8] = (20, 30, 220)
    return rgb


def write_tiff_pyramid(path: Path, level0: np.ndarray, description: str | None = None) -> Path:
    """A two-level tiled TIFF at 0.5 µm/px, as OpenSlide's generic-tiff reads it."""
    resolution = {"resolution": (1e4 / 0.5, 1e4 / 0.5), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tif:
        tif.write(level0, tile=(256, 256), photometric="rgb", compression="jpeg",
                  description=description, metadata=None, **resolution)
        tif.write(level0[::4, ::4], tile=(256, 256), photometric="rgb", compression="jpeg",
                  subfiletype=1)
    return path


def write_dicom_wsi(folder: Path, rgb: np.ndarray, mpp: float, *, name: str = "level",
                    container_id: str = "SLIDE-1", levels: int = 2, tile: int = 256,
                    seed: str = "") -> list[Path]:
    """Write ``rgb`` (level 0, (H, W, 3) uint8) at ``mpp`` µm/px as a DICOM-WSI series of
    ``levels`` files ``folder/<name>-<level>.dcm``, each level half the size of the one
    before. UIDs derive from ``seed`` and ``container_id``, so a rewrite is the same series.
    Returns the files, level 0 first."""
    folder.mkdir(parents=True, exist_ok=True)
    key = [seed, container_id]
    series = {"StudyInstanceUID": generate_uid(entropy_srcs=[*key, "study"]),
              "SeriesInstanceUID": generate_uid(entropy_srcs=[*key, "series"]),
              "FrameOfReferenceUID": generate_uid(entropy_srcs=[*key, "frame"])}
    image = Image.fromarray(rgb)
    paths = []
    for level in range(levels):
        if level:
            image = image.reduce(2)
        path = folder / f"{name}-{level}.dcm"
        _instance(image, mpp * 2 ** level, level, tile, container_id, series,
                  generate_uid(entropy_srcs=[*key, str(level)])).save_as(
                      path, enforce_file_format=True)
        paths.append(path)
    return paths


def _instance(image: Image.Image, mpp: float, level: int, tile: int, container_id: str,
              series: dict[str, str], sop_uid: str) -> Dataset:
    width, height = image.size
    across, down = -(-width // tile), -(-height // tile)
    canvas = Image.new("RGB", (across * tile, down * tile), "white")
    canvas.paste(image)
    frames = []
    for row in range(down):  # TILED_FULL: frames row by row, left to right
        for col in range(across):
            buffer = io.BytesIO()
            canvas.crop((col * tile, row * tile, (col + 1) * tile, (row + 1) * tile)).save(
                buffer, format="JPEG", quality=90, subsampling=1)  # 4:2:2, as YBR_FULL_422
            frames.append(buffer.getvalue())

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = VLWholeSlideMicroscopyImageStorage, sop_uid
    for keyword, uid in series.items():
        setattr(ds, keyword, uid)
    ds.Modality, ds.PatientID, ds.PatientName = "SM", "SYNTHETIC", "Synthetic^Slide"
    ds.StudyDate, ds.StudyTime, ds.SeriesNumber, ds.InstanceNumber = "20260101", "000000", 1, \
        level + 1
    ds.ContainerIdentifier = container_id
    ds.ImageType = (["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if level == 0
                    else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"])
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.Rows = ds.Columns = tile
    ds.NumberOfFrames = len(frames)
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
    ds.TotalPixelMatrixFocalPlanes = ds.NumberOfOpticalPaths = 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, \
        "YBR_FULL_422", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = width * mpp / 1e3, height * mpp / 1e3
    measures = Dataset()
    measures.PixelSpacing = [mpp / 1e3, mpp / 1e3]  # mm, row then column
    measures.SliceThickness = 0.001
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    path_item = Dataset()
    path_item.OpticalPathIdentifier = "1"
    ds.OpticalPathSequence = [path_item]
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    return ds


def write_secondary_capture(path: Path) -> Path:
    """A DICOM file of another kind than a whole-slide image (a Secondary Capture, as a
    screenshot or scanned report is stored), 8x8 px of grey."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path.name)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, \
        meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(path.name), "series"])
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "OT", 8, 8, 1
    ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = \
        "MONOCHROME2", 8, 8, 7
    ds.PixelRepresentation, ds.PixelData = 0, bytes([128]) * 64
    ds.save_as(path, enforce_file_format=True)
    return path

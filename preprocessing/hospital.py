"""A hospital's preprocessing job: its slide list to patch bags, a manifest and QC pictures.

Every slide is tiled in its own process and recorded as ``ok`` or ``failed`` with a one-line
reason; one bad slide never stops the others. A rerun skips slides whose bag is present and
valid, so an interrupted job resumes where it stopped.

Patch labels: a slide's tumour annotation is the ``annotation`` column of the CSV (a GeoJSON
path relative to the CSV; empty for none) or else ``<annotations>/<slide_id>.geojson`` when
an annotation directory is given and that file exists; its ``label`` column (0, 1 or empty)
gives weak labels to slides without one. A label other than 0/1 fails that slide alone.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import h5py
from tqdm import tqdm

from formats.atomic import atomic_path, make_directory
from formats.hospital_dir import BAGS, MANIFEST_COLUMNS, bag_path, manifest_path
from wsi.bag import (
    FORMAT_VERSION,
    BagError,
    PatchLabels,
    bag_version,
    check_bag,
    read_labels,
)
from wsi.dicom import DicomInstance, is_dicom_file, level0_instance, read_instance, series_error
from wsi.slide import SlideError

from .isolation import run_isolated
from .tile import TileResult, TilingOptions, tile_slide

log = logging.getLogger(__name__)

# Extensions of the slide formats OpenSlide reads from one file (a MIRAX .mrxs has its data in
# a companion folder of the same name). DICOM-WSI slides are series of files, found by content.
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".mrxs", ".scn", ".bif",
                    ".svslide")
# Joins the folder names and file stem of a slide found below the cohort folder into its id.
ID_SEPARATOR = "__"


class SlideListError(ValueError):
    """The slide list itself (a directory or CSV) is unusable; names the file and the problem."""


@dataclass(frozen=True)
class SlideEntry:
    """One slide to preprocess."""

    slide_id: str
    path: Path
    label: str = ""  # as written in the slide list; see slide_label()
    annotation: Path | None = None
    error: str = ""  # why the slide list already makes it fail (it is then not tiled)

    def slide_label(self) -> int | None:
        """The label as 0 or 1 (None when empty); :class:`SlideError` for anything else."""
        if not self.label:
            return None
        try:
            value = float(self.label)  # "1.0" from a spreadsheet is 1
        except ValueError:
            value = None
        if value not in (0.0, 1.0):
            raise SlideError(self.path, f"slide label {self.label!r} is not 0 or 1")
        return int(value)

    def label_source(self) -> str | None:
        """The ``source`` its bag's labels will have (None: no labels)."""
        if self.annotation is not None:
            return "annotation"
        return "slide" if self.label else None


@dataclass(frozen=True)
class ManifestRow:
    """One line of a hospital's manifest (DESIGN.md)."""

    slide_id: str
    path: str  # the slide file, absolute (symlinks kept), as its bag's source_path
    label: str
    status: str  # "ok" or "failed"
    n_patches: int
    mpp: float | None
    mpp_source: str  # as the bag's attribute: "file", "fill" or "override"; empty if failed
    error: str


def read_slide_list(source: str | Path,
                    annotations: str | Path | None = None) -> list[SlideEntry]:
    """Slides from a directory or a CSV with ``slide_id,path,label`` and optionally
    ``annotation``; slides without an annotation there take
    ``annotations/<slide_id>.geojson`` when that exists.

    A directory is searched recursively, in path order, leaving out hidden files and folders
    and MIRAX data folders. A slide file (by extension) is named by its path below the
    directory without the extension, parts joined by ``__``: ``s1.svs`` is ``s1``,
    ``case_7/HE.svs`` is ``case_7__HE``. DICOM files (``.dcm``, or any file with the DICOM
    preamble) are grouped by SeriesInstanceUID within each folder, one whole-slide series
    being one slide, listed by its level-0 file. It is named by its folder (``case_7``); in
    a folder that holds several series, or in the directory itself, each is named
    ``<folder>__<ContainerIdentifier>``, with the SeriesInstanceUID in place of a missing or
    repeated ContainerIdentifier. DICOM files of other kinds are left out with a warning;
    an unreadable DICOM file, a truncated one and a series without its full-resolution
    image fail (their entry's ``error``).

    Relative CSV paths are taken relative to the CSV's directory; every slide path comes
    back absolute, so a manifest means the same from any working directory. A CSV names a
    DICOM-WSI slide by its folder (which must hold one series; its level-0 file is listed)
    or by any one of its files, and its series is checked as in a directory.
    """
    source = Path(os.path.abspath(source))
    if source.is_dir():
        entries = _slides_in_directory(source)
    elif source.is_file():
        entries = _slides_in_csv(source)
    else:
        raise SlideListError(f"{source}: no such directory or CSV file")
    if annotations is None:
        return entries
    annotations = Path(annotations)
    if not annotations.is_dir():
        raise SlideListError(f"{annotations}: annotation directory not found")
    found = {p.stem: p for p in annotations.glob("*.geojson")}
    return [replace(e, annotation=found.get(e.slide_id)) if e.annotation is None else e
            for e in entries]


def _slides_in_directory(directory: Path) -> list[SlideEntry]:
    """The slides anywhere under ``directory``, in path order (see :func:`read_slide_list`)."""
    entries, dicom_files = [], defaultdict(list)
    for path in _walk(directory, set()):
        if path.suffix.lower() in SLIDE_EXTENSIONS:
            entries.append(SlideEntry(_slide_id(directory, path.with_suffix("")), path))
        elif _is_dicom(path):
            dicom_files[path.parent].append(path)
    for folder, paths in dicom_files.items():
        entries += _dicom_slides(directory, folder, paths)
    if not entries:
        raise SlideListError(f"{directory}: no slide files ({', '.join(SLIDE_EXTENSIONS)}) or "
                             "DICOM-WSI series in it or its subfolders")
    return _fail_shared_stems(sorted(entries, key=lambda e: e.path))


def _walk(folder: Path, seen: set[tuple[int, int]]) -> Iterator[Path]:
    """The files under ``folder``, depth first in name order, leaving out hidden files and
    folders (``.DS_Store``, macOS's ``._s1.svs``), MIRAX companion folders, and folders
    already seen (a symbolic link back up the tree)."""
    try:
        stat = folder.stat()
        children = sorted(folder.iterdir())
    except OSError as exc:
        raise SlideListError(f"{folder}: cannot list the folder ({exc.strerror})") from exc
    if (stat.st_dev, stat.st_ino) in seen:
        return
    seen.add((stat.st_dev, stat.st_ino))
    mirax_data = {c.stem for c in children if c.suffix.lower() == ".mrxs"}
    for child in children:
        if child.name.startswith("."):
            continue
        if child.is_dir():
            if child.name not in mirax_data:
                yield from _walk(child, seen)
        elif child.is_file():
            yield child


def _slide_id(directory: Path, path: Path) -> str:
    """``path`` (a file without its extension, or a folder) relative to ``directory``, its
    parts joined by :data:`ID_SEPARATOR`; empty for ``directory`` itself."""
    return ID_SEPARATOR.join(path.relative_to(directory).parts)


def _dicom_slides(directory: Path, folder: Path, paths: list[Path]) -> list[SlideEntry]:
    """The slides of the DICOM files ``paths`` in ``folder``: one per whole-slide series,
    listed by its level-0 file, and one failed entry per file whose header is unreadable."""
    series, unreadable = _read_dicom_files(folder, paths)
    entries = [SlideEntry(_slide_id(directory, Path(exc.path).with_suffix("")), Path(exc.path),
                          error=str(exc)) for exc in unreadable]
    ids = _dicom_slide_ids(_slide_id(directory, folder), series)
    for uid, instances in series.items():
        entries.append(SlideEntry(ids[uid], level0_instance(instances).path,
                                  error=series_error(instances) or ""))
    return entries


def _read_dicom_files(folder: Path, paths: list[Path]
                      ) -> tuple[dict[str, list[DicomInstance]], list[SlideError]]:
    """The whole-slide instances among the DICOM files ``paths`` of ``folder``, by series,
    and the errors of files whose header is unreadable. Files of other kinds (a DICOMDIR,
    annotations, reports) are left out with a warning."""
    series, unreadable, others = defaultdict(list), [], []
    for path in paths:
        try:
            instance = read_instance(path)
        except SlideError as exc:
            unreadable.append(exc)
            continue
        if instance.is_wsi:
            series[instance.series_uid].append(instance)
        else:
            others.append(instance)
    if others:
        log.warning("%s: skipping %d DICOM files that are not whole-slide images: %s", folder,
                    len(others), ", ".join(f"{i.path.name} ({i.sop_class.name or 'no SOP class'})"
                                           for i in others))
    return dict(series), unreadable


def _is_dicom(path: Path) -> bool:
    return path.suffix.lower() == ".dcm" or is_dicom_file(path)


def _dicom_csv_entry(entry: SlideEntry,
                     folders: dict[Path, dict[str, list[DicomInstance]]]) -> SlideEntry:
    """A CSV entry whose path is a folder, or one DICOM file, of a DICOM-WSI slide: a folder
    must hold one series and is replaced by its level-0 file; either fails when its series
    is incomplete. ``folders`` caches the series of each folder read."""
    folder = entry.path if entry.path.is_dir() else entry.path.parent
    if folder not in folders:
        try:
            files = [p for p in sorted(folder.iterdir())
                     if p.is_file() and not p.name.startswith(".") and _is_dicom(p)]
        except OSError as exc:
            return replace(entry, error=f"{folder}: cannot list the folder ({exc.strerror})")
        folders[folder] = _read_dicom_files(folder, files)[0]
    series = folders[folder]
    if entry.path.is_dir():
        if len(series) != 1:
            return replace(entry, error=(
                f"{entry.path}: a folder of {len(series)} DICOM whole-slide series, not one; "
                "give the path of one of the slide's files"))
        [instances] = series.values()
        return replace(entry, path=level0_instance(instances).path,
                       error=series_error(instances) or "")
    for instances in series.values():
        if any(i.path == entry.path for i in instances):
            return replace(entry, error=series_error(instances) or "")
    return entry  # not a whole-slide image: opening it says what it is


def _dicom_slide_ids(folder_id: str, series: dict[str, list[DicomInstance]]) -> dict[str, str]:
    """Slide ids of the DICOM ``series`` of one folder (``folder_id``, empty for the cohort
    folder): the folder's id when it holds one series; otherwise, appended to it, each
    series's ContainerIdentifier (the glass slide's label), or its SeriesInstanceUID where
    the identifier is missing or shared by two series of the folder."""
    if len(series) == 1 and folder_id:
        return dict.fromkeys(series, folder_id)
    labels = {uid: _file_name(level0_instance(instances).container_id)
              for uid, instances in series.items()}
    counts = Counter(labels.values())
    ids = {}
    for uid, label in labels.items():
        name = label if label and counts[label] == 1 else uid
        ids[uid] = ID_SEPARATOR.join(part for part in (folder_id, name) if part)
    return ids


def _file_name(text: str) -> str:
    """``text`` made a safe file name part: runs of anything but letters, digits, ``.``, ``-``
    and ``_`` become ``_``, and no leading dot."""
    return re.sub(r"[^\w.-]+", "_", text).strip("._")


def _fail_shared_stems(entries: list[SlideEntry]) -> list[SlideEntry]:
    """Mark files whose names differ only in extension (``s1.svs``, ``s1.ndpi``) as failed:
    their slide_id, and so their bag, would be the same. The other slides are unaffected."""
    by_id: dict[str, list[Path]] = defaultdict(list)
    for entry in entries:
        by_id[entry.slide_id].append(entry.path)
    return [e if len(by_id[e.slide_id]) == 1 else replace(e, error=(
        f"{e.path}: slide_id {e.slide_id!r} is also that of "
        f"{', '.join(str(p) for p in by_id[e.slide_id] if p != e.path)}; rename one of the "
        "files, or list the slides in a CSV with a distinct slide_id for each"))
        for e in entries]


def _slides_in_csv(csv_path: Path) -> list[SlideEntry]:
    with csv_path.open(newline="", encoding="utf-8-sig") as f:  # Excel's "CSV UTF-8" has a BOM
        reader = csv.DictReader(f)
        missing = {"slide_id", "path"} - set(reader.fieldnames or ())
        if missing:
            raise SlideListError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}; "
                                 "expected slide_id,path,label")
        entries, dicom_folders = [], {}
        for line, row in enumerate(reader, start=2):
            slide_id, path = (row.get("slide_id") or "").strip(), (row.get("path") or "").strip()
            if not slide_id or not path:
                raise SlideListError(f"{csv_path}: line {line} has an empty slide_id or path")
            if "/" in slide_id or slide_id.startswith("."):
                raise SlideListError(f"{csv_path}: line {line}: slide_id {slide_id!r} is not a "
                                     "plain file name")
            annotation = (row.get("annotation") or "").strip()
            entry = SlideEntry(slide_id, Path(os.path.abspath(csv_path.parent / path)),
                               (row.get("label") or "").strip(),
                               csv_path.parent / annotation if annotation else None)
            if entry.path.is_dir() or (entry.path.is_file() and _is_dicom(entry.path)):
                entry = _dicom_csv_entry(entry, dicom_folders)
            entries.append(entry)
    if not entries:
        raise SlideListError(f"{csv_path}: no slides listed")
    return _unique(csv_path, entries)


def _unique(source: Path, entries: list[SlideEntry]) -> list[SlideEntry]:
    seen: dict[str, Path] = {}
    for entry in entries:
        if entry.slide_id in seen:
            raise SlideListError(f"{source}: slide_id {entry.slide_id!r} appears twice "
                                 f"({seen[entry.slide_id]}, {entry.path})")
        seen[entry.slide_id] = entry.path
    return entries


def write_manifest(path: Path, rows: list[ManifestRow]) -> None:
    """Write the manifest CSV atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        for row in rows:
            record = asdict(row)
            record["mpp"] = "" if row.mpp is None else f"{row.mpp:.6g}"
            writer.writerow(record)


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Read a manifest written by :func:`write_manifest`."""
    with Path(path).open(newline="", encoding="utf-8") as f:
        return [ManifestRow(slide_id=r["slide_id"], path=r["path"], label=r["label"],
                            status=r["status"], n_patches=int(r["n_patches"]),
                            mpp=float(r["mpp"]) if r["mpp"] else None,
                            mpp_source=r["mpp_source"], error=r["error"])
                for r in csv.DictReader(f)]


def _existing_bag_row(entry: SlideEntry, bag: Path,
                      options: TilingOptions) -> ManifestRow | None:
    """The manifest row of a bag that a rerun can keep: valid, of the current format, tiled
    with this run's settings and with the labels this run would give it (an annotation
    added since is not missed)."""
    try:
        n = check_bag(bag)
    except BagError:
        return None
    with h5py.File(bag, "r") as f:
        if (bag_version(f) != FORMAT_VERSION or not _tiling_current(f, options)
                or not _labels_current(entry, options, read_labels(f))):
            return None
        mpp, mpp_source = float(f.attrs["mpp_level0"]), str(f.attrs["mpp_source"])
    return ManifestRow(entry.slide_id, str(entry.path), entry.label, "ok", n, mpp, mpp_source,
                       "")


def _tiling_current(f: h5py.File, options: TilingOptions) -> bool:
    """Whether the open bag ``f`` was tiled as this run would tile it: the same target
    resolution, patch size and encoding, and its level-0 mpp from the same rule (the file's
    own value, a fill-in or an override, and the same user value)."""
    patches = f["patches"].attrs
    if (float(f.attrs["target_mpp"]), int(patches["patch_size"]), patches["encoding"],
            int(patches["encoding_level"])) != (options.target_mpp, options.patch_size,
                                                options.encoding.name, options.encoding.level):
        return False
    source, mpp = f.attrs["mpp_source"], float(f.attrs["mpp_level0"])
    if options.override_mpp is not None:
        return source == "override" and mpp == options.override_mpp
    # Without an override, a file that states its mpp always gives it.
    return source == "file" or (source == "fill" and mpp == options.fill_mpp)


def _labels_current(entry: SlideEntry, options: TilingOptions,
                    labels: PatchLabels | None) -> bool:
    """Whether a bag's ``labels`` are those this run would write for ``entry`` (an edited
    annotation file is not noticed: that needs ``--force``)."""
    source = entry.label_source()
    if labels is None or source is None:
        return labels is None and source is None
    if (labels.source, labels.threshold) != (source, options.tumour_threshold):
        return False
    try:
        return source == "annotation" or bool((labels.values == entry.slide_label()).all())
    except SlideError:  # re-tiling reports the bad label in the manifest
        return False


def _bag_path(out_dir: Path, entry: SlideEntry) -> Path:
    return bag_path(out_dir, entry.slide_id)


def _qc_path(out_dir: Path, entry: SlideEntry) -> Path:
    return out_dir / "qc" / f"{entry.slide_id}.png"


def _tile_entry(out_dir: Path, options: TilingOptions, entry: SlideEntry) -> TileResult:
    return tile_slide(entry.path, _bag_path(out_dir, entry), options, slide_id=entry.slide_id,
                      qc_path=_qc_path(out_dir, entry), annotation=entry.annotation,
                      slide_label=entry.slide_label(), progress=False)


def _failed(hospital: str, out_dir: Path, entry: SlideEntry, error: str) -> ManifestRow:
    """The manifest row of a slide that failed; deletes an earlier run's bag and picture of
    it, which would contradict the row."""
    _bag_path(out_dir, entry).unlink(missing_ok=True)
    _qc_path(out_dir, entry).unlink(missing_ok=True)
    log.warning("%s: %s failed: %s", hospital, entry.slide_id, error)
    return ManifestRow(entry.slide_id, str(entry.path), entry.label, "failed", 0, None, "",
                       error)


def preprocess_hospital(hospital: str, slides: str | Path, out_dir: str | Path,
                        options: TilingOptions | None = None, *, workers: int = 1,
                        annotations: str | Path | None = None, force: bool = False,
                        progress: bool = True) -> list[ManifestRow]:
    """Tile every slide of ``hospital`` into ``out_dir/bags``, with ``out_dir/manifest.csv``
    and ``out_dir/qc/<slide_id>.png``; ``annotations`` is a directory of
    ``<slide_id>.geojson`` tumour annotations. Returns the manifest rows, in slide-list order.

    A slide has a bag and a QC picture exactly when its row is ``ok``: a failed slide's
    files from an earlier run are deleted.
    """
    out_dir = Path(out_dir)
    options = options or TilingOptions()
    entries = read_slide_list(slides, annotations)
    make_directory(out_dir / BAGS)
    # Keyed by entry: two files of a directory can share a (failed) slide_id.
    rows: dict[SlideEntry, ManifestRow] = {}
    todo = []
    for entry in entries:
        if entry.error:
            rows[entry] = _failed(hospital, out_dir, entry, entry.error)
        elif not force and (existing := _existing_bag_row(entry, _bag_path(out_dir, entry),
                                                          options)):
            rows[entry] = existing
        else:
            todo.append(entry)
    skipped = len(entries) - len(todo) - sum(bool(e.error) for e in entries)
    if skipped:
        log.info("%s: %d of %d slides already have a valid bag; skipping them", hospital,
                 skipped, len(entries))
    bar = tqdm(total=len(todo), unit="slide", desc=hospital, disable=None if progress else True)
    with bar:
        for entry, outcome in run_isolated(partial(_tile_entry, out_dir, options), todo, workers):
            result = outcome.result
            if result is None:
                rows[entry] = _failed(hospital, out_dir, entry, outcome.error or "")
            else:
                rows[entry] = ManifestRow(entry.slide_id, str(entry.path), entry.label, "ok",
                                          result.n_patches, result.mpp, result.mpp_source, "")
            bar.update()
    ordered = [rows[e] for e in entries]
    write_manifest(manifest_path(out_dir), ordered)
    n_ok = sum(r.status == "ok" for r in ordered)
    log.info("%s: %d slides ok (%d patches), %d failed; manifest %s", hospital, n_ok,
             sum(r.n_patches for r in ordered), len(ordered) - n_ok, manifest_path(out_dir))
    return ordered

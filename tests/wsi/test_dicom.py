"""DICOM-WSI slides in a hospital's folder: written series open in OpenSlide, slide folders
are searched recursively, instances are grouped by series and named stably, and a damaged or
incomplete series fails alone."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import openslide
import pytest
from slide_files import he_pixels, write_dicom_wsi, write_secondary_capture

from preprocessing.hospital import SlideListError, preprocess_hospital, read_slide_list
from wsi.slide import open_slide


def _entries(folder):
    return [(e.slide_id, e.path, e.error) for e in read_slide_list(folder)]


def test_a_written_series_opens_in_openslide_from_any_instance(tmp_path):
    rgb = he_pixels()[:1536]
    paths = write_dicom_wsi(tmp_path / "s", rgb, 0.25, levels=3)
    for path in (paths[0], paths[2]):
        with openslide.OpenSlide(path) as osr:
            assert osr.properties[openslide.PROPERTY_NAME_VENDOR] == "dicom"
            assert osr.level_dimensions == ((2048, 1536), (1024, 768), (512, 384))
            assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
            assert float(osr.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.25)
            tissue = np.asarray(osr.read_region((900, 700), 0, (64, 64)).convert("RGB"))
            assert np.abs(tissue.astype(int) - (190, 100, 170)).max() <= 3
            assert np.asarray(osr.read_region((0, 0), 2, (32, 32)).convert("RGB")).min() >= 235
    with open_slide(paths[1]) as slide:
        assert (slide.info.mpp, slide.info.mpp_source, slide.info.level_count) == (0.25, "file", 3)


def test_one_folder_per_slide_and_several_series_in_one_folder(tmp_path):
    cohort = tmp_path / "cohort"
    rgb = he_pixels()[:512, :768]
    write_dicom_wsi(cohort / "site_a" / "case_1", rgb, 0.5, container_id="S-1")
    write_dicom_wsi(cohort / "case_2", rgb, 0.5, container_id="S-2")
    write_dicom_wsi(cohort / "both", rgb, 0.5, name="a", container_id="S 3/A")
    write_dicom_wsi(cohort / "both", rgb, 0.5, name="b", container_id="S-4")
    assert _entries(cohort) == [
        ("both__S_3_A", cohort / "both" / "a-0.dcm", ""),
        ("both__S-4", cohort / "both" / "b-0.dcm", ""),
        ("case_2", cohort / "case_2" / "level-0.dcm", ""),
        ("site_a__case_1", cohort / "site_a" / "case_1" / "level-0.dcm", ""),
    ]
    # Each of the two series in one folder opens as itself, not as its neighbour.
    for name, container in (("a", "S 3/A"), ("b", "S-4")):
        with openslide.OpenSlide(cohort / "both" / f"{name}-0.dcm") as osr:
            assert osr.properties["dicom.ContainerIdentifier"] == container
            assert osr.level_count == 2


def test_series_in_the_cohort_folder_itself_and_shared_identifiers_use_the_uid(tmp_path):
    rgb = he_pixels()[:512, :512]
    write_dicom_wsi(tmp_path, rgb, 0.5, name="first", container_id="", seed="1")
    write_dicom_wsi(tmp_path, rgb, 0.5, name="x1", container_id="X", seed="2")
    write_dicom_wsi(tmp_path, rgb, 0.5, name="x2", container_id="X", seed="3")
    write_dicom_wsi(tmp_path, rgb, 0.5, name="y", container_id="Y")
    uids = {e.path.name: _series_uid(e.path) for e in read_slide_list(tmp_path)}
    assert _entries(tmp_path) == [
        (uids["first-0.dcm"], tmp_path / "first-0.dcm", ""),
        (uids["x1-0.dcm"], tmp_path / "x1-0.dcm", ""),
        (uids["x2-0.dcm"], tmp_path / "x2-0.dcm", ""),
        ("Y", tmp_path / "y-0.dcm", ""),
    ]
    assert len({uids[f"{name}-0.dcm"] for name in ("first", "x1", "x2")}) == 3


def _series_uid(path):
    with openslide.OpenSlide(path) as osr:
        return osr.properties["dicom.SeriesInstanceUID"]


def test_dicom_files_without_an_extension_are_found_by_their_content(tmp_path):
    # PACS exports name files by UID: "1.2.826.0.1.3680043.10.1" has the "extension" ".1".
    paths = write_dicom_wsi(tmp_path / "case", he_pixels()[:512, :512], 0.5)
    renamed = [p.rename(p.with_name(f"1.2.826.0.1.3680043.10.{i}")) for i, p in enumerate(paths)]
    (tmp_path / "case" / "notes.txt").write_text("not a slide")
    (tmp_path / "case" / "IM0001").write_bytes(b"\0" * 200)
    assert _entries(tmp_path) == [("case", renamed[0], "")]
    with open_slide(renamed[0]) as slide:
        assert slide.info.level_count == 2


def test_other_dicom_files_are_left_out_with_a_warning(tmp_path, caplog):
    paths = write_dicom_wsi(tmp_path / "case", he_pixels()[:512, :512], 0.5)
    write_secondary_capture(tmp_path / "case" / "report.dcm")
    write_secondary_capture(tmp_path / "alone.dcm")
    with caplog.at_level(logging.WARNING):
        assert _entries(tmp_path) == [("case", paths[0], "")]
    assert "report.dcm (Secondary Capture Image Storage)" in caplog.text
    assert "alone.dcm (Secondary Capture Image Storage)" in caplog.text
    with open_slide(paths[0]) as slide:  # OpenSlide passes over the other file too
        assert slide.info.level_count == 2


def test_a_damaged_or_incomplete_series_fails_alone_naming_the_file(tmp_path):
    rgb = he_pixels()[:1024, :1024]
    write_dicom_wsi(tmp_path / "good", rgb, 0.5, container_id="G")
    missing = write_dicom_wsi(tmp_path / "missing", rgb, 0.5, levels=3, container_id="M")
    missing[0].unlink()
    cut = write_dicom_wsi(tmp_path / "cut", rgb, 0.5, container_id="C")
    cut[1].write_bytes(cut[1].read_bytes()[:-5000])
    (tmp_path / "broken.dcm").write_text("not DICOM")
    entries = {e.slide_id: e for e in read_slide_list(tmp_path)}
    assert sorted(entries) == ["broken", "cut", "good", "missing"]
    assert entries["good"].error == ""
    assert entries["missing"].path == missing[1]
    assert entries["missing"].error.startswith(
        f"{missing[1]}: incomplete DICOM series {_series_uid(missing[1])}: ")
    assert entries["missing"].error.endswith(
        ": the full-resolution image is missing (the largest of its 2 files is a RESAMPLED "
        "level of 512x512 px); copy the whole series")
    assert entries["cut"].path == cut[0]
    assert re.fullmatch(rf"{re.escape(str(cut[1]))}: DICOM file is truncated: it holds [0-3] "
                        rf"of its 4 frames \(series {_series_uid(cut[0])}\); copy it again",
                        entries["cut"].error)
    assert entries["broken"].error.startswith(f"{tmp_path / 'broken.dcm'}: unreadable DICOM file")
    for entry in entries.values():
        assert "\n" not in entry.error


def test_a_series_without_a_pyramid_image_fails(tmp_path):
    [path] = write_dicom_wsi(tmp_path / "case", he_pixels()[:256, :256], 0.5, levels=1)
    _set_image_type(path, ["ORIGINAL", "PRIMARY", "LABEL", "NONE"])
    [(slide_id, listed, error)] = _entries(tmp_path)
    assert (slide_id, listed) == ("case", path)
    assert error.startswith(f"{path}: incomplete DICOM series ") and error.endswith(
        ": no pyramid image among its 1 files (ORIGINAL/PRIMARY/LABEL/NONE)")


def _set_image_type(path, image_type):
    import pydicom

    ds = pydicom.dcmread(path)
    ds.ImageType = image_type
    ds.save_as(path)


def test_slide_folders_are_searched_recursively(tmp_path, real_slide):
    cohort = tmp_path / "cohort"
    for name in ("s1.svs", "case_7/HE.svs", "a/b.svs", "a__b.svs", ".trash/old.svs",
                 "._s1.svs", "m/inside.svs"):
        (cohort / name).parent.mkdir(parents=True, exist_ok=True)
        (cohort / name).symlink_to(real_slide)
    (cohort / "m.mrxs").write_text("MIRAX index; its data folder m/ is not searched")
    (cohort / "case_7" / "loop").symlink_to(cohort)
    entries = read_slide_list(cohort)
    assert [(e.slide_id, e.path) for e in entries] == [
        ("a__b", cohort / "a" / "b.svs"), ("a__b", cohort / "a__b.svs"),
        ("case_7__HE", cohort / "case_7" / "HE.svs"), ("m", cohort / "m.mrxs"),
        ("s1", cohort / "s1.svs")]
    assert entries[0].error.startswith(f"{cohort / 'a' / 'b.svs'}: slide_id 'a__b' is also that "
                                       f"of {cohort / 'a__b.svs'}; ")
    assert [bool(e.error) for e in entries] == [True, True, False, False, False]


def test_a_csv_names_a_dicom_slide_by_its_folder_or_one_of_its_files(tmp_path):
    rgb = he_pixels()[:1024, :1024]
    good = write_dicom_wsi(tmp_path / "good", rgb, 0.5, levels=3)
    write_dicom_wsi(tmp_path / "two", rgb, 0.5, name="a", container_id="A")
    write_dicom_wsi(tmp_path / "two", rgb, 0.5, name="b", container_id="B")
    missing = write_dicom_wsi(tmp_path / "missing", rgb, 0.5, levels=3, container_id="M")
    missing[0].unlink()
    csv = tmp_path / "labels.csv"
    csv.write_text("slide_id,path,label\nA,good,1\nB,good/level-2.dcm,0\nC,two,1\n"
                   "D,missing/level-2.dcm,0\n")
    entries = read_slide_list(csv)
    assert [(e.slide_id, e.path, e.label) for e in entries] == [
        ("A", good[0], "1"), ("B", good[2], "0"), ("C", tmp_path / "two", "1"),
        ("D", missing[2], "0")]
    assert [e.error for e in entries[:2]] == ["", ""]
    assert entries[2].error == (f"{tmp_path / 'two'}: a folder of 2 DICOM whole-slide series, "
                                "not one; give the path of one of the slide's files")
    assert entries[3].error.startswith(f"{missing[1]}: incomplete DICOM series ")
    rows = preprocess_hospital("h", csv, tmp_path / "out", progress=False)
    assert [(r.status, r.error == e.error) for r, e in zip(rows, entries, strict=True)] == [
        ("ok", True), ("ok", True), ("failed", True), ("failed", True)]
    assert rows[0].n_patches == rows[1].n_patches > 0  # two files of one slide: the same slide


def test_an_unreadable_subfolder_stops_the_listing_naming_it(tmp_path, monkeypatch):
    (tmp_path / "locked").mkdir()
    (tmp_path / "s1.svs").write_bytes(b"")
    iterdir = Path.iterdir

    def refuse_locked(self):
        if self.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", refuse_locked)
    with pytest.raises(SlideListError, match="locked: cannot list the folder"
                                              r" \(Permission denied\)$"):
        read_slide_list(tmp_path)


def test_a_folder_of_no_whole_slide_image_is_no_slide_list(tmp_path):
    write_secondary_capture(tmp_path / "case" / "report.dcm")
    (tmp_path / "notes.txt").write_text("not a slide")
    with pytest.raises(SlideListError, match=rf"^{re.escape(str(tmp_path))}: no slide files "
                                             r"\(\.svs, .*\) or DICOM-WSI series in it"):
        read_slide_list(tmp_path)

"""A hospital's preprocessing job: bad slides are recorded, not fatal; reruns resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
from damage import zero_tile_data
from slide_files import (
    dapi_pixels,
    he_pixels,
    write_dicom_wsi,
    write_secondary_capture,
    write_tiff_pyramid,
)

from preprocessing.hospital import (
    SlideListError,
    preprocess_hospital,
    read_manifest,
    read_slide_list,
)
from preprocessing.isolation import run_isolated
from preprocessing.options import TilingOptions
from wsi.bag import read_labels
from wsi.synthetic import SyntheticSlideSpec, tumour_geojson, write_synthetic_slide

SLIDEFED = [sys.executable, "-m", "slidefed"]


def _cohort(tmp_path: Path, real_slide: Path, n_good: int = 2) -> Path:
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(n_good):
        (slides / f"good{i}.svs").symlink_to(real_slide)
    (slides / "text.svs").write_text("not a slide")
    (slides / "truncated.svs").write_bytes(real_slide.read_bytes()[:500_000])
    zero_tile_data(real_slide, slides / "zeroed.svs", tiles=slice(5, 40))
    (slides / "notes.txt").write_text("ignored: not a slide extension")
    return slides


def test_bad_slides_are_recorded_and_the_rest_tiled(tmp_path, real_slide):
    slides = _cohort(tmp_path, real_slide)
    out = tmp_path / "out"
    rows = preprocess_hospital("h1", slides, out, workers=2, progress=False)
    by_id = {r.slide_id: r for r in rows}
    assert set(by_id) == {"good0", "good1", "text", "truncated", "zeroed"}
    assert by_id["good0"].status == by_id["good1"].status == "ok"
    assert by_id["good0"].n_patches > 10 and by_id["good0"].mpp == pytest.approx(0.499)
    assert by_id["text"].status == "failed" and "not a slide format" in by_id["text"].error
    assert "truncated" in by_id["truncated"].error
    # A decoder error of the direct JPEG path used to reach the manifest without the file.
    assert by_id["zeroed"].error.startswith(f"{slides / 'zeroed.svs'}: cannot read region")
    assert read_manifest(out / "manifest.csv") == rows
    assert sorted(p.name for p in (out / "bags").iterdir()) == ["good0.h5", "good1.h5"]
    assert (out / "qc" / "good0.png").is_file()


def test_rerun_skips_valid_bags_and_force_retiles(tmp_path, real_slide):
    slides = _cohort(tmp_path, real_slide, n_good=1)
    out = tmp_path / "out"
    preprocess_hospital("h1", slides, out, progress=False)
    bag = out / "bags" / "good0.h5"
    first = bag.stat().st_mtime_ns
    rows = preprocess_hospital("h1", slides, out, progress=False)
    assert bag.stat().st_mtime_ns == first
    assert {r.slide_id: r.status for r in rows}["good0"] == "ok"
    preprocess_hospital("h1", slides, out, force=True, progress=False)
    assert bag.stat().st_mtime_ns != first


def test_csv_slide_list_with_labels_and_relative_paths(tmp_path, real_slide):
    (tmp_path / "a.svs").symlink_to(real_slide)
    csv = tmp_path / "labels.csv"
    csv.write_text("slide_id,path,label\nA,a.svs,1\nB,missing.svs,0\n")
    rows = preprocess_hospital("h1", csv, tmp_path / "out", progress=False)
    assert [(r.slide_id, r.label, r.status) for r in rows] == [("A", "1", "ok"),
                                                                ("B", "0", "failed")]
    assert "file not found" in rows[1].error


def test_csv_saved_by_excel_with_a_byte_order_mark_is_read(tmp_path):
    # Excel's "CSV UTF-8" starts with a BOM; the header's first name used to be
    # "\ufeffslide_id", reported as a missing column slide_id.
    csv = tmp_path / "labels.csv"
    csv.write_bytes("slide_id,path,label\r\nÅ1,å1.svs,1\r\n".encode("utf-8-sig"))
    [entry] = read_slide_list(csv)
    assert (entry.slide_id, entry.path, entry.label) == ("Å1", tmp_path / "å1.svs", "1")


def test_files_sharing_a_stem_fail_alone_naming_each_other(tmp_path, real_slide):
    # s1.svs and s1.ndpi used to abort the whole hospital, naming neither file.
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("good.svs", "s1.svs", "s1.ndpi"):
        (slides / name).symlink_to(real_slide)
    out = tmp_path / "out"
    (out / "bags").mkdir(parents=True)
    (out / "bags" / "s1.h5").write_bytes(b"an earlier run's bag of one of them")
    rows = preprocess_hospital("h1", slides, out, progress=False)
    assert [(r.slide_id, r.path, r.status) for r in rows] == [
        ("good", str(slides / "good.svs"), "ok"), ("s1", str(slides / "s1.ndpi"), "failed"),
        ("s1", str(slides / "s1.svs"), "failed")]
    assert rows[1].error == (
        f"{slides / 's1.ndpi'}: slide_id 's1' is also that of {slides / 's1.svs'}; rename one "
        "of the files, or list the slides in a CSV with a distinct slide_id for each")
    assert rows[2].error.startswith(f"{slides / 's1.svs'}: slide_id 's1' is also that of "
                                    f"{slides / 's1.ndpi'}; ")
    assert read_manifest(out / "manifest.csv") == rows
    assert sorted(p.name for p in (out / "bags").iterdir()) == ["good.h5"]


@pytest.mark.parametrize("text, problem", [
    ("id,file\nA,a.svs\n", "missing column"),
    ("slide_id,path\nA,a.svs\nA,b.svs\n", r"appears twice \(.*a.svs, .*b.svs\)"),
    ("slide_id,path\n", "no slides listed"),
    ("slide_id,path\n../x,a.svs\n", "not a plain file name"),
])
def test_bad_slide_lists_name_the_file(tmp_path, text, problem):
    csv = tmp_path / "list.csv"
    csv.write_text(text)
    with pytest.raises(SlideListError, match=problem) as err:
        read_slide_list(csv)
    assert str(csv) in str(err.value)


def _crash_on_two(job: int) -> int:
    if job == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    if job == 3:
        raise ValueError("bad input\nwith a second line")
    return job * 10


def test_a_crashing_job_does_not_take_down_the_others():
    outcomes = dict(run_isolated(_crash_on_two, [1, 2, 3, 4], workers=2))
    assert outcomes[1].result == 10 and outcomes[4].result == 40
    assert outcomes[2].result is None and "SIGKILL" in outcomes[2].error
    assert outcomes[3].error == "bad input with a second line"


def test_cli_exits_nonzero_only_when_every_slide_failed(tmp_path, real_slide):
    slides = _cohort(tmp_path, real_slide, n_good=1)
    ok = subprocess.run([*SLIDEFED, "-q", "preprocess", "--hospital", "h1", "--slides",
                         str(slides), "-o", str(tmp_path / "o1")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "1 of 4 slides ok" in ok.stdout and "failed text: " in ok.stdout
    (slides / "good0.svs").unlink()
    bad = subprocess.run([*SLIDEFED, "-q", "preprocess", "--hospital", "h1", "--slides",
                          str(slides), "-o", str(tmp_path / "o2")], capture_output=True,
                         text=True)
    assert bad.returncode == 1 and "0 of 3 slides ok" in bad.stdout


@pytest.mark.slow
def test_sigterm_mid_run_leaves_no_partial_bag_and_rerun_completes(tmp_path, real_slide):
    slides = tmp_path / "slides"
    slides.mkdir()
    # Enough slides that the job is still running when the signal comes: a slide of CMU takes
    # ~0.2 s, and the test must not pass or fail with the speed of the machine.
    n = 40
    for i in range(n):
        (slides / f"s{i:02d}.svs").symlink_to(real_slide)
    out = tmp_path / "out"
    command = [*SLIDEFED, "preprocess", "--hospital", "h1", "--slides", str(slides),
               "-o", str(out)]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list((out / "bags").glob("*.h5")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=30) != 0
    bags = out / "bags"
    assert not [p.name for p in bags.iterdir() if not p.name.endswith(".h5")]
    done = sorted(bags.glob("*.h5"))
    assert 0 < len(done) < n and not (out / "manifest.csv").exists()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{n} of {n} slides ok" in rerun.stdout
    assert f"{len(done)} of {n} slides already have a valid bag" in rerun.stderr


@pytest.fixture(scope="module")
def annotated_slide(tmp_path_factory):
    """A small synthetic slide with tumour, and its annotation."""
    out = tmp_path_factory.mktemp("annotated")
    spec = SyntheticSlideSpec(width=2048, height=2048, tumour_regions=2, seed=11,
                              level_downsample=2, smallest_level_px=512)
    slide = write_synthetic_slide(out / "t.tiff", spec)
    annotation = out / "t.geojson"
    annotation.write_text(json.dumps(tumour_geojson(slide.tumour_polygons)))
    return slide.path, annotation


def _labels(bag):
    with h5py.File(bag, "r") as f:
        return read_labels(f)


def test_annotations_and_slide_labels_become_patch_labels_bad_ones_fail_alone(
        tmp_path, annotated_slide):
    slide, annotation = annotated_slide
    (tmp_path / "s.tiff").symlink_to(slide)
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "t.geojson").symlink_to(annotation)
    (tmp_path / "ann" / "none.geojson").write_text('{"type": "FeatureCollection", '
                                                   '"features": []}')
    (tmp_path / "ann" / "bad.geojson").write_text('{"type": "FeatureCollection", "feat')
    csv = tmp_path / "labels.csv"
    csv.write_text("slide_id,path,label,annotation\n"
                   "tumour,s.tiff,1,ann/t.geojson\n"
                   "normal,s.tiff,0,ann/none.geojson\n"
                   "broken,s.tiff,1,ann/bad.geojson\n"
                   "lost,s.tiff,1,ann/lost.geojson\n"
                   "odd,s.tiff,2,\n"
                   "weak,s.tiff,1,\n"
                   "relabelled,s.tiff,1,\n"
                   "unlabelled,s.tiff,,\n")
    out = tmp_path / "out"
    options = TilingOptions(patch_size=128)
    rows = {r.slide_id: r for r in preprocess_hospital("h1", csv, out, options, workers=2,
                                                       progress=False)}
    assert {k: r.status for k, r in rows.items()} == {
        "tumour": "ok", "normal": "ok", "broken": "failed", "lost": "failed", "odd": "failed",
        "weak": "ok", "relabelled": "ok", "unlabelled": "ok"}
    assert rows["broken"].error.startswith(f"{tmp_path / 'ann' / 'bad.geojson'}: not valid JSON")
    assert rows["lost"].error == f"{tmp_path / 'ann' / 'lost.geojson'}: annotation file not found"
    assert rows["odd"].error == f"{tmp_path / 's.tiff'}: slide label '2' is not 0 or 1"
    assert all("\n" not in r.error for r in rows.values())
    bags = out / "bags"
    tumour, normal, weak = (_labels(bags / f"{s}.h5") for s in ("tumour", "normal", "weak"))
    assert tumour.source == normal.source == "annotation" and weak.source == "slide"
    assert tumour.tumour.any() and not normal.values.any() and (weak.values == 1).all()
    assert _labels(bags / "unlabelled.h5") is None
    assert read_manifest(out / "manifest.csv") == list(rows.values())

    # An annotation directory, given later, labels the slides the CSV left without one, and
    # the rerun re-tiles exactly those and the relabelled slide (their bags' labels would be
    # stale), keeping the rest.
    (tmp_path / "ann" / "weak.geojson").symlink_to(annotation)
    csv.write_text(csv.read_text().replace("relabelled,s.tiff,1,", "relabelled,s.tiff,0,"))
    kept = {s: (bags / f"{s}.h5").stat().st_mtime_ns for s in ("tumour", "unlabelled")}
    preprocess_hospital("h1", csv, out, options, annotations=tmp_path / "ann", progress=False)
    assert {s: (bags / f"{s}.h5").stat().st_mtime_ns for s in kept} == kept
    assert _labels(bags / "weak.h5").source == "annotation"
    assert not _labels(bags / "relabelled.h5").values.any()
    assert read_slide_list(csv, tmp_path / "ann")[0].annotation == tmp_path / "ann/t.geojson"
    with pytest.raises(SlideListError, match="annotation directory not found"):
        read_slide_list(csv, tmp_path / "nowhere")


def test_a_slide_that_fails_half_way_leaves_no_picture_and_no_stale_bag(tmp_path,
                                                                        zeroed_level0):
    # The overview reads, the patches do not: the QC picture used to be written anyway.
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "s.tiff").symlink_to(zeroed_level0)
    out = tmp_path / "out"
    assert preprocess_hospital("h1", slides, out, progress=False)[0].status == "failed"
    assert not (out / "qc").exists() and not list((out / "bags").iterdir())
    # A slide that succeeded once and fails on a forced rerun loses its old bag and picture.
    (slides / "s.tiff").unlink()
    (slides / "s.tiff").symlink_to(zeroed_level0.parent / "good.tiff")
    assert preprocess_hospital("h1", slides, out, progress=False)[0].status == "ok"
    assert (out / "bags" / "s.h5").is_file() and (out / "qc" / "s.png").is_file()
    (slides / "s.tiff").unlink()
    (slides / "s.tiff").symlink_to(zeroed_level0)
    [row] = preprocess_hospital("h1", slides, out, force=True, progress=False)
    assert row.status == "failed" and "cannot read region" in row.error
    assert not list((out / "bags").iterdir()) and not list((out / "qc").iterdir())


def test_mpp_rules_are_recorded_and_a_changed_rule_retiles(tmp_path):
    # --slide-mpp used to override stated values and was not part of a bag's validity, so a
    # rerun with another value kept bags tiled at the old one.
    slides = tmp_path / "slides"
    for name, mpp in (("stated", 0.25), ("unstated", None)):
        write_synthetic_slide(slides / f"{name}.tiff", SyntheticSlideSpec(
            width=1536, height=1536, mpp=mpp, tumour_regions=0, level_downsample=2,
            smallest_level_px=384))
    out, bags = tmp_path / "out", tmp_path / "out" / "bags"

    def run(**mpp):
        rows = preprocess_hospital("h1", slides, out, TilingOptions(patch_size=128, **mpp),
                                   progress=False)
        assert read_manifest(out / "manifest.csv") == rows
        return {r.slide_id: (r.mpp, r.mpp_source) for r in rows}

    def mtimes():
        return {p.stem: p.stat().st_mtime_ns for p in bags.iterdir()}

    assert run(fill_mpp=0.3) == {"stated": (0.25, "file"), "unstated": (0.3, "fill")}
    first = mtimes()
    assert run(fill_mpp=0.3) == {"stated": (0.25, "file"), "unstated": (0.3, "fill")}
    assert mtimes() == first
    assert run(fill_mpp=0.4)["unstated"] == (0.4, "fill")
    second = mtimes()
    assert second["stated"] == first["stated"] and second["unstated"] != first["unstated"]
    assert run(override_mpp=0.4) == {"stated": (0.4, "override"),
                                     "unstated": (0.4, "override")}
    third = mtimes()
    assert all(third[s] != second[s] for s in third)
    run(override_mpp=0.4)
    assert mtimes() == third
    with h5py.File(bags / "stated.h5", "r") as f:
        assert f.attrs["mpp_source"] == "override" and f.attrs["mpp_level0"] == 0.4


def test_manifest_path_and_bag_source_path_are_the_same_absolute_path(tmp_path, real_slide,
                                                                      monkeypatch):
    # The manifest's path was relative to the working directory of the run, the bag's
    # source_path absolute with symlinks resolved: two spellings of one slide.
    from federation.data.slides import read_manifest as read_for_training

    (tmp_path / "site" / "slides").mkdir(parents=True)
    (tmp_path / "site" / "slides" / "a.svs").symlink_to(real_slide)
    (tmp_path / "site" / "lists").mkdir()
    (tmp_path / "site" / "lists" / "labels.csv").write_text("slide_id,path,label\n"
                                                            "A,../slides/a.svs,1\n")
    monkeypatch.chdir(tmp_path / "site")
    [row] = preprocess_hospital("h1", "lists/labels.csv", "out", progress=False)
    expected = str(tmp_path / "site" / "slides" / "a.svs")
    assert row.path == expected and read_manifest(tmp_path / "site/out/manifest.csv") == [row]
    with h5py.File(tmp_path / "site/out/bags/A.h5", "r") as f:
        assert f.attrs["source_path"] == expected
    monkeypatch.chdir(tmp_path)
    assert read_for_training(tmp_path / "site" / "out") == [
        ("A", 1, tmp_path / "site" / "out" / "bags" / "A.h5")]


def test_a_mixed_hospital_folder_gives_every_slide_its_right_manifest_row(tmp_path,
                                                                          real_slide):
    # Issue 9's "done means": good slides of several formats and layouts, damaged ones and a
    # fluorescence slide in one folder; every slide gets its row, and only the good ones bags.
    slides, out = tmp_path / "hospital", tmp_path / "out"
    write_synthetic_slide(slides / "synthetic.tiff", SyntheticSlideSpec(
        width=2048, height=2048, mpp=0.5, tumour_regions=0, level_downsample=2,
        smallest_level_px=512))
    (slides / "aperio").mkdir()
    (slides / "aperio" / "cmu.svs").symlink_to(real_slide)
    (slides / "truncated.svs").write_bytes(real_slide.read_bytes()[:500_000])
    zero_tile_data(real_slide, slides / "zeroed.svs", tiles=slice(5, 40))
    (slides / "text.svs").write_text("not a slide")
    write_tiff_pyramid(slides / "dapi.tiff", dapi_pixels())
    write_dicom_wsi(slides / "dicom_case", he_pixels(), 0.5, container_id="C-1")
    half = he_pixels()
    half[1000:] = 238  # the second series of a folder has half the tissue of the first
    write_dicom_wsi(slides / "two_series", he_pixels(), 0.5, name="a", container_id="C-2")
    write_dicom_wsi(slides / "two_series", half, 0.5, name="b", container_id="C-3")
    write_secondary_capture(slides / "two_series" / "screenshot.dcm")
    cut = write_dicom_wsi(slides / "dicom_cut", he_pixels(), 0.5, container_id="C-4")
    cut[1].write_bytes(cut[1].read_bytes()[:-3000])
    no_level0 = write_dicom_wsi(slides / "dicom_no_level0", he_pixels(), 0.5, levels=3,
                                container_id="C-5")
    no_level0[0].unlink()

    rows = preprocess_hospital("h1", slides, out, workers=2, progress=False)
    ok = {"aperio__cmu": (slides / "aperio" / "cmu.svs", 0.499),
          "dicom_case": (slides / "dicom_case" / "level-0.dcm", 0.5),
          "synthetic": (slides / "synthetic.tiff", 0.5),
          "two_series__C-2": (slides / "two_series" / "a-0.dcm", 0.5),
          "two_series__C-3": (slides / "two_series" / "b-0.dcm", 0.5)}
    failed = {"dapi": (slides / "dapi.tiff", "not a brightfield slide: "),
              "dicom_cut": (slides / "dicom_cut" / "level-0.dcm",
                            f"{cut[1]}: DICOM file is truncated: "),
              "dicom_no_level0": (no_level0[1], "incomplete DICOM series "),
              "text": (slides / "text.svs", "not a slide format"),
              "truncated": (slides / "truncated.svs", "truncated"),
              "zeroed": (slides / "zeroed.svs", "cannot read region")}
    assert [r.slide_id for r in rows] == sorted(ok.keys() | failed.keys())
    by_id = {r.slide_id: r for r in rows}
    for slide_id, (path, mpp) in ok.items():
        row = by_id[slide_id]
        assert (row.path, row.status, row.error, row.mpp_source) == (str(path), "ok", "", "file")
        assert row.n_patches > 0 and row.mpp == pytest.approx(mpp, abs=1e-3)
        with h5py.File(out / "bags" / f"{slide_id}.h5", "r") as f:
            assert (f.attrs["slide_id"], f.attrs["source_path"]) == (slide_id, str(path))
    for slide_id, (path, reason) in failed.items():
        row = by_id[slide_id]
        assert (row.path, row.status, row.n_patches, row.mpp) == (str(path), "failed", 0, None)
        named = reason if reason.startswith("/") else f"{path}: "
        assert row.error.startswith(named) and reason in row.error and "\n" not in row.error
    assert by_id["two_series__C-3"].n_patches < by_id["two_series__C-2"].n_patches
    assert read_manifest(out / "manifest.csv") == rows
    assert sorted(p.stem for p in (out / "bags").iterdir()) == sorted(ok)
    assert sorted(p.stem for p in (out / "qc").iterdir()) == sorted(ok)

"""The slidefed command line: one-line errors with non-zero exits, and the commands chained."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from slidefed.cli import main

SLIDEFED = [sys.executable, "-m", "slidefed"]


@pytest.mark.parametrize("args, mentions", [
    (["--mpp", "-1"], "--mpp"),
    (["--mpp", "zero"], "--mpp"),
    (["--min-tissue", "2"], "--min-tissue"),
    (["--patch-size", "abc"], "--patch-size"),
    (["--encoding", "png"], "--encoding"),
    (["--workers", "0"], "--workers"),
])
def test_nonsense_arguments_are_one_line_errors(tmp_path, args, mentions):
    run = subprocess.run([*SLIDEFED, "tile", str(tmp_path / "s.svs"), "-o",
                          str(tmp_path / "b.h5"), *args], capture_output=True, text=True)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and mentions in lines[0]


def test_bad_encoding_level_is_a_one_line_error(tmp_path, capsys):
    code = main(["tile", str(tmp_path / "s.svs"), "-o", str(tmp_path / "b.h5"),
                 "--encoding", "jpeg", "--encoding-level", "100"])
    assert code == 1
    assert capsys.readouterr().err.strip() == "error: jpeg level must be 1-95, got 100"


def test_missing_slide_names_the_file(tmp_path, capsys):
    missing = tmp_path / "nope.svs"
    assert main(["-q", "tile", str(missing), "-o", str(tmp_path / "b.h5")]) == 1
    assert capsys.readouterr().err.strip() == f"error: {missing}: file not found"
    assert not list(tmp_path.iterdir())


def test_synthetic_slide_tile_and_validate_chain(tmp_path, capsys):
    slide, bag = tmp_path / "s.tiff", tmp_path / "s.h5"
    assert main(["-q", "synthetic-slide", "-o", str(slide), "--width", "2048", "--seed", "4"]) == 0
    assert main(["-q", "tile", str(slide), "-o", str(bag), "--patch-size", "128"]) == 0
    capsys.readouterr()
    assert main(["validate", "--deep", str(bag)]) == 0
    assert capsys.readouterr().out.startswith(f"ok {bag}: ")
    bag.write_bytes(bag.read_bytes()[:2000])
    assert main(["validate", str(bag)]) == 1


def test_help_runs_as_a_module_without_the_heavy_libraries():
    # Every rank of `mpiexec ... python -m slidefed federate` and every Snakemake job parses
    # the full parser: it must not pay for torch, opacus, MPI or OpenSlide.
    probe = ("import sys; from slidefed.cli import build_parser; build_parser().format_help(); "
             "print(sorted({m.split('.')[0] for m in sys.modules} "
             "& {'torch', 'opacus', 'mpi4py', 'openslide', 'timm'}))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
    run = subprocess.run([*SLIDEFED, "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("usage: slidefed ")


def test_tile_with_an_annotation_and_validate_deep_finds_a_damaged_patch(tmp_path, capsys):
    slide, bag, annotation = tmp_path / "s.tiff", tmp_path / "s.h5", tmp_path / "s.geojson"
    annotation.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": {
        "type": "Polygon", "coordinates": [[[0, 0], [1024, 0], [1024, 2048], [0, 2048]]]}}))
    assert main(["-q", "synthetic-slide", "-o", str(slide), "--width", "2048", "--seed", "4"]) == 0
    assert main(["-q", "tile", str(slide), "-o", str(bag), "--patch-size", "128",
                 "--annotation", str(annotation), "--label", "1",
                 "--tumour-threshold", "0.25"]) == 0
    with h5py.File(bag, "r") as f:
        labels = f["labels"]
        assert labels.attrs["source"] == "annotation" and labels.attrs["threshold"] == 0.25
        left = f["coords"][:, 0] + f["coords"].attrs["patch_size_level0"] <= 1024
        np.testing.assert_array_equal(labels[()], left.astype(np.float32))
        last = len(left) - 2
        stored = bytes(f["patches"][last])
    data = bytearray(bag.read_bytes())
    data[data.find(stored) + len(stored) // 2] ^= 0xFF
    bag.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["validate", str(bag)]) == 0  # the shallow check reads the last patch only
    assert main(["validate", "--deep", str(bag)]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"error: {bag}: patch {last} is corrupt (checksum mismatch)")


def test_label_must_be_0_or_1(tmp_path):
    run = subprocess.run([*SLIDEFED, "tile", str(tmp_path / "s.svs"), "-o",
                          str(tmp_path / "b.h5"), "--label", "2"], capture_output=True, text=True)
    assert run.returncode == 2 and "--label" in run.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_corrupt_tile_data_is_one_line_and_leaves_nothing(tmp_path, zeroed_level0, workers):
    # Used to be an imagecodecs traceback with exit status 0; with workers, SlideError did
    # not survive pickling and the pool waited forever.
    bag = tmp_path / "b.h5"
    run = subprocess.run([*SLIDEFED, "-q", "tile", str(zeroed_level0), "-o", str(bag),
                          "--workers", workers], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {zeroed_level0}: cannot read region")
    assert "JPEG tile" in lines[0] and not list(tmp_path.iterdir())


@pytest.mark.parametrize("outputs, message", [
    (["-o", "adir"], "{out}/adir: is a directory, not a bag file"),
    (["-o", "afile/b.h5"], "{out}/afile: is a file, not a directory"),
    (["-o", "b.h5", "--qc", "afile/b.png"], "{out}/afile: is a file, not a directory"),
])
def test_unusable_output_paths_are_one_line_and_leave_nothing(real_slide, tmp_path, outputs,
                                                               message):
    # An existing directory used to cost a traceback and a leftover .partial bag; a file
    # as the parent, a traceback. A QC picture that cannot be written takes its bag along.
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").touch()
    run = subprocess.run([*SLIDEFED, "-q", "tile", str(real_slide),
                          *(str(tmp_path / a) if i % 2 else a for i, a in enumerate(outputs))],
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.splitlines() == [f"error: {message.format(out=tmp_path)}"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["adir", "afile"]


def test_preprocess_into_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").touch()
    (tmp_path / "s.svs").write_text("not read")
    assert main(["-q", "preprocess", "--hospital", "h", "--slides", str(tmp_path),
                 "-o", str(tmp_path / "afile")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'afile' / 'bags'}: Not a directory\n"


def test_fill_and_override_mpp_exclude_each_other_and_slide_mpp_is_gone(tmp_path):
    base = [*SLIDEFED, "tile", str(tmp_path / "s.svs"), "-o", str(tmp_path / "b.h5")]
    for extra, mentions in ((["--fill-mpp", "0.5", "--override-mpp", "0.5"], "not allowed"),
                            (["--slide-mpp", "0.5"], "--slide-mpp")):
        run = subprocess.run([*base, *extra], capture_output=True, text=True)
        assert run.returncode == 2 and mentions in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1

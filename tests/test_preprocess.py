"""A hospital's preprocessing job: bad slides are recorded, not fatal; reruns resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from preprocessing.hospital import (
    SlideListError,
    preprocess_hospital,
    read_manifest,
    read_slide_list,
)
from preprocessing.isolation import run_isolated

SLIDEFED = [sys.executable, "-m", "slidefed"]


def _cohort(tmp_path: Path, real_slide: Path, n_good: int = 2) -> Path:
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(n_good):
        (slides / f"good{i}.svs").symlink_to(real_slide)
    (slides / "text.svs").write_text("not a slide")
    (slides / "truncated.svs").write_bytes(real_slide.read_bytes()[:500_000])
    (slides / "notes.txt").write_text("ignored: not a slide extension")
    return slides


def test_bad_slides_are_recorded_and_the_rest_tiled(tmp_path, real_slide):
    slides = _cohort(tmp_path, real_slide)
    out = tmp_path / "out"
    rows = preprocess_hospital("h1", slides, out, workers=2, progress=False)
    by_id = {r.slide_id: r for r in rows}
    assert set(by_id) == {"good0", "good1", "text", "truncated"}
    assert by_id["good0"].status == by_id["good1"].status == "ok"
    assert by_id["good0"].n_patches > 10 and by_id["good0"].mpp == pytest.approx(0.499)
    assert by_id["text"].status == "failed" and "not a slide format" in by_id["text"].error
    assert "truncated" in by_id["truncated"].error
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


@pytest.mark.parametrize("text, problem", [
    ("id,file\nA,a.svs\n", "missing column"),
    ("slide_id,path\nA,a.svs\nA,b.svs\n", "appears twice"),
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
    assert "1 of 3 slides ok" in ok.stdout and "failed text: " in ok.stdout
    (slides / "good0.svs").unlink()
    bad = subprocess.run([*SLIDEFED, "-q", "preprocess", "--hospital", "h1", "--slides",
                          str(slides), "-o", str(tmp_path / "o2")], capture_output=True,
                         text=True)
    assert bad.returncode == 1 and "0 of 2 slides ok" in bad.stdout


@pytest.mark.slow
def test_sigterm_mid_run_leaves_no_partial_bag_and_rerun_completes(tmp_path, real_slide):
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(10):
        (slides / f"s{i:02d}.svs").symlink_to(real_slide)
    out = tmp_path / "out"
    command = [*SLIDEFED, "preprocess", "--hospital", "h1", "--slides", str(slides),
               "-o", str(out)]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list((out / "bags").glob("*.h5")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=30) != 0
    bags = out / "bags"
    assert not [p.name for p in bags.iterdir() if not p.name.endswith(".h5")]
    done = sorted(bags.glob("*.h5"))
    assert 0 < len(done) < 10 and not (out / "manifest.csv").exists()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "10 of 10 slides ok" in rerun.stdout
    assert f"{len(done)} of 10 slides already have a valid bag" in rerun.stderr

"""The Snakemake workflow end to end on a tiny synthetic cohort (configs/ci.yaml's): cohort,
per-hospital jobs, federation (one MPI job per algorithm), slide-level evaluation, heatmaps
and the results report; then what a rerun and a changed slide would run. The workflow runs
once, for every test of this module."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import pytest
import yaml
from browser import read_page, rendered_dom, screenshot
from PIL import Image, ImageStat

from wsi.bag import check_bag, read_labels

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


HOSPITALS = ("hospital_a", "hospital_b")
ALGORITHMS = ("proxyfl", "regular")


@dataclass(frozen=True)
class Workflow:
    """The tiny workflow, run once for this module's tests; they must leave it as it was."""

    out: Path  # its output_dir
    command: list[str]  # snakemake with its config; add -n for a dry run
    env: dict[str, str]

    def snakemake(self, *arguments: str) -> str:
        """What snakemake with ``arguments`` printed (stdout, then stderr); it must succeed."""
        run = subprocess.run([*self.command, *arguments], cwd=REPO, env=self.env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout + run.stderr


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> Workflow:
    """configs/ci.yaml's cohort (2 hospitals of 6 slides, 2 rounds of ProxyFL and Regular)
    through every rule, from nothing, in a directory of its own."""
    tmp_path = tmp_path_factory.mktemp("workflow")
    out = tmp_path / "results"
    config = yaml.safe_load((REPO / "configs" / "ci.yaml").read_text())
    config.update({
        "output_dir": str(out),
        "hospitals": {h: str(out / "cohort" / h / "labels.csv") for h in HOSPITALS},
        "federation": {**config["federation"],
                       "config": str(REPO / "configs" / "slides_demo.yaml")},
    })
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-c2",
               "--configfile", str(config_file)]
    run = subprocess.run([*command, "-q"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return Workflow(out, command, env)


@pytest.mark.slow
def test_snakemake_runs_the_demo_workflow_on_a_tiny_cohort(workflow):
    out = workflow.out
    for hospital in HOSPITALS:  # only the configured hospitals, not the demo config's others
        rows = list(csv.DictReader((out / "preprocessed" / hospital / "manifest.csv").open()))
        assert [r["status"] for r in rows] == ["ok"] * 6
        for row in rows:
            bag = out / "preprocessed" / hospital / "bags" / f"{row['slide_id']}.h5"
            assert check_bag(bag) == int(row["n_patches"]) > 0
            with h5py.File(bag, "r") as f:  # labels.csv names each slide's annotation
                labels = read_labels(f)
            assert labels.source == "annotation"
            assert labels.tumour.any() == (row["label"] == "1")
    assert not (out / "preprocessed" / "hospital_c").exists()
    for algorithm in ALGORITHMS:
        run_dir = out / "federation" / algorithm
        metrics = json.loads((run_dir / "slide_metrics.json").read_text())
        models = {"proxyfl": {"private", "proxy"}, "regular": {"private"}}[algorithm]
        assert set(metrics) == models
        with (run_dir / "heatmaps.csv").open() as handle:
            heatmaps = list(csv.DictReader(handle))
        test_slides = 0
        for hospital in HOSPITALS:
            with (run_dir / "hospitals" / hospital / "splits.csv").open() as handle:
                splits = list(csv.DictReader(handle))
            assert len(splits) == 6 and {r["split"] for r in splits} == {
                "train", "validation", "test"}
            tested = [r["slide_id"] for r in splits if r["split"] == "test"]
            test_slides += len(tested)
            assert {p.stem for p in (run_dir / "hospitals" / hospital / "models").glob("*.pt")
                    } == models
            # The heatmap rule drew the first 3 test slides of the hospital with each model.
            drawn = [h for h in heatmaps if h["hospital"] == hospital]
            assert sorted((h["slide_id"], h["model"]) for h in drawn) == sorted(
                (slide, model) for slide in tested[:3] for model in models)
            assert all((run_dir / h["path"]).is_file() for h in drawn)
        for model in models:
            assert set(metrics[model]["hospitals"]) == set(HOSPITALS)
            assert metrics[model]["pooled"]["slides"] == test_slides
    assert (out / "report.html").is_file()
    for rule in ("heatmap_proxyfl", "heatmap_regular", "results_report"):
        assert (out / "logs" / f"{rule}.log").is_file()
        assert (out / "benchmarks" / f"{rule}.tsv").is_file()


@pytest.mark.slow
def test_a_second_run_does_nothing(workflow):
    assert "Nothing to be done" in workflow.snakemake("-n")


def _planned(workflow: Workflow) -> tuple[dict[str, int], dict[str, str]]:
    """A dry run's jobs per rule, and each output's plan (``--summary``)."""
    text = workflow.snakemake("-n")
    stats = text[text.index("Job stats:"):].split("\n")[3:]
    jobs = {}
    for line in stats:
        if not line.strip() or line.startswith("total"):
            break
        rule, count = line.split()
        jobs[rule] = int(count)
    plans = {}
    # --summary: output_file, date, rule, log-file(s), status, plan
    for line in workflow.snakemake("-n", "--summary").splitlines():
        fields = line.split("\t")
        if len(fields) >= 6 and Path(fields[0]).is_relative_to(workflow.out):
            plans[Path(fields[0]).relative_to(workflow.out).as_posix()] = fields[5]
    return jobs, plans


@pytest.mark.slow
def test_a_changed_slide_reruns_its_hospital_and_what_follows_only(workflow):
    slide = workflow.out / "cohort" / "hospital_a" / "slides" / "hospital_a_001.tiff"
    original = slide.read_bytes()
    # A rescan: new content. (Snakemake 9 keeps checksums of inputs under 1 MB and does not
    # rerun for a bare `touch` of one that leaves its content as it was.)
    slide.write_bytes(original + b"\0")
    try:
        jobs, plans = _planned(workflow)
    finally:
        slide.write_bytes(original)
    assert jobs == {"preprocess": 1, "federate": 2, "evaluate": 2, "heatmap": 2,
                    "results_report": 1, "all": 1}
    assert plans["preprocessed/hospital_a/manifest.csv"] == "update pending"
    assert plans["preprocessed/hospital_b/manifest.csv"] == "no update"
    assert plans["cohort/hospital_a/labels.csv"] == "no update"
    assert plans["report.html"] == "update pending"


@pytest.mark.slow
def test_the_report_renders_in_chromium_with_every_table_and_picture(workflow, chromium,
                                                                    tmp_path):
    report = workflow.out / "report.html"
    dom, check = rendered_dom(chromium, report, tmp_path)
    assert check["broken"] == [] and check["images"] > 0
    page = read_page(dom)
    assert [h for h, _ in page.tables["cohort-table"]] == list(HOSPITALS)
    assert {h for h, _ in page.tables["slide-metrics-table"]} == {*HOSPITALS, "pooled"}
    assert [h for h, _ in page.tables["cross-site-table:proxyfl"]] == list(HOSPITALS)
    assert [h for h, _ in page.tables["final-epsilon:proxyfl"]] == list(HOSPITALS)
    alts = [image["alt"] for image in page.images]
    with (workflow.out / "federation" / "proxyfl" / "heatmaps.csv").open() as handle:
        proxyfl_heatmaps = sum(1 for _ in csv.DictReader(handle))
    with (workflow.out / "federation" / "regular" / "heatmaps.csv").open() as handle:
        regular_heatmaps = sum(1 for _ in csv.DictReader(handle))
    assert sum(a.startswith("heatmap of") for a in alts) == proxyfl_heatmaps + regular_heatmaps
    assert sum(a.startswith("QC picture") for a in alts) == 2 * 6
    png = screenshot(chromium, report, tmp_path / "report.png")
    with Image.open(png) as shot:  # drawn, not blank
        assert shot.size == (1300, 8000)
        assert ImageStat.Stat(shot.convert("L")).stddev[0] > 20

"""The workflow's config checks: each misconfigured cohort fails ``snakemake -n`` at start, in
one line naming the key, before any job runs; the shipped configs pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slidefed.workflow import preprocess_options, slide_files

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


def dry_run(workdir: Path, config: Path, *options: str) -> subprocess.CompletedProcess:
    """``snakemake -n -p`` of the workflow in ``workdir``; stdout and stderr together."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                           "-n", "-p", "-c1", "--configfile", str(config), *options],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=120)


@pytest.fixture
def cohort(tmp_path: Path) -> dict:
    """A valid two-hospital cohort: a labelled CSV and a folder of (empty) slide files."""
    (tmp_path / "site_1").mkdir()
    (tmp_path / "site_1" / "labels.csv").write_text("slide_id,path,label\ns1,s1.svs,1\n")
    (tmp_path / "site_2").mkdir()
    (tmp_path / "site_2" / "s2.svs").write_bytes(b"")
    (tmp_path / "site_2" / "labels.csv").write_text("slide_id,path,label\ns2,s2.svs,0\n")
    return {"output_dir": str(tmp_path / "results"),
            "hospitals": {"site_1": str(tmp_path / "site_1" / "labels.csv"),
                          "site_2": {"slides": str(tmp_path / "site_2" / "labels.csv"),
                                     "annotations": str(tmp_path / "site_2")}},
            "tiling": {"mpp": 1.0, "patch_size": 64},
            "federation": {"config": "configs/slides_demo.yaml",
                           "algorithms": ["proxyfl", "regular"]}}


def write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "cohort.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_valid_cohort_passes_the_checks(tmp_path, cohort):
    run = dry_run(tmp_path, write(tmp_path, cohort))
    assert run.returncode == 0, run.stdout[-2000:]
    assert f"--slides {tmp_path}/site_2/labels.csv" in run.stdout
    assert f"--annotations {tmp_path}/site_2 " in run.stdout
    assert "slidefed federate" in run.stdout and "slidefed evaluate" in run.stdout
    assert "slidefed heatmap" in run.stdout and "--limit 3" in run.stdout  # schema's default
    assert f"slidefed results-report {tmp_path}/results --workflow-config -" in run.stdout


@pytest.mark.parametrize("config", ["configs/demo.yaml", "configs/ci.yaml"])
def test_the_shipped_configs_pass_the_checks(tmp_path, config):
    run = dry_run(tmp_path, REPO / config)
    assert run.returncode == 0, run.stdout[-2000:]


def test_the_cohort_template_passes_the_checks_once_its_paths_exist(tmp_path, cohort):
    template = yaml.safe_load((REPO / "configs" / "cohort_template.yaml").read_text())
    assert [type(v) for v in template["hospitals"].values()] == [str, dict]  # both forms
    template["hospitals"] = cohort["hospitals"]
    template["output_dir"] = cohort["output_dir"]
    run = dry_run(tmp_path, write(tmp_path, template))
    assert run.returncode == 0, run.stdout[-2000:]
    for algorithm in template["federation"]["algorithms"]:
        assert f"--set algorithm={algorithm} " in run.stdout


def test_the_slurm_profile_launches_federate_with_srun_pmi2(tmp_path):
    # The profile's resources without the SLURM plugin: the same profile, executed locally.
    run = dry_run(tmp_path, REPO / "configs" / "ci.yaml", "--profile",
                  str(REPO / "configs" / "slurm"), "--executor", "local")
    assert run.returncode == 0, run.stdout[-2000:]
    assert run.stdout.count("srun --mpi=pmi2 -n 2 slidefed federate") == 2
    assert "slurm_partition=cpu" in run.stdout


def _missing_folder(c, tmp):
    c["hospitals"]["site_1"] = str(tmp / "nowhere")


def _missing_csv(c, tmp):
    c["hospitals"]["site_2"]["slides"] = str(tmp / "site_2" / "lables.csv")


def _missing_annotations(c, tmp):
    c["hospitals"]["site_2"]["annotations"] = str(tmp / "geojson")


def _wrong_columns(c, tmp):
    (tmp / "site_1" / "labels.csv").write_text("slide,file,label\ns1,s1.svs,1\n")


def _no_label_column(c, tmp):
    (tmp / "site_1" / "labels.csv").write_text("slide_id,path,diagnosis\ns1,s1.svs,1\n")


def _bad_hospital_name(c, tmp):
    c["hospitals"]["site 3/x"] = c["hospitals"].pop("site_1")


def _unknown_algorithm(c, tmp):
    c["federation"]["algorithms"] = ["proxyfl", "fedavgg"]


def _unknown_key(c, tmp):
    c["tilling"] = c.pop("tiling")


def _unknown_tiling_key(c, tmp):
    c["tiling"]["mpp_target"] = 0.5


def _tiling_unlike_training(c, tmp):
    c["tiling"]["mpp"] = 0.5


def _bad_override(c, tmp):
    c["federation"]["set"] = ["dp.noise=2"]


def _missing_federation_config(c, tmp):
    c["federation"]["config"] = str(tmp / "slides.yaml")


def _no_heatmaps(c, tmp):
    c["report"] = {"heatmaps_per_hospital": 0}


def _demo_hospitals_mismatch(c, tmp):
    c["demo_cohort"] = {"hospitals": 3, "seed": 0}


@pytest.mark.parametrize("break_it, message", [
    (_missing_folder, "config: hospitals.site_1: {tmp}/nowhere: no such directory or CSV file"),
    (_missing_csv, "config: hospitals.site_2: {tmp}/site_2/lables.csv: no such directory or "
                   "CSV file"),
    (_missing_annotations, "config: hospitals.site_2: {tmp}/geojson: annotation directory "
                           "not found"),
    (_wrong_columns, "config: hospitals.site_1: {tmp}/site_1/labels.csv: missing column(s) "
                     "path, slide_id; expected slide_id,path,label"),
    (_no_label_column, "config: hospitals.site_1: {tmp}/site_1/labels.csv: no slide has a "
                       "label, which training needs"),
    (_bad_hospital_name, "config: hospitals: 'site 3/x' is not a valid file name"),
    (_unknown_algorithm, "config: federation.algorithms: unknown algorithm 'fedavgg'; choose "
                         "from regular,"),
    (_unknown_key, "config: top level: Additional properties are not allowed ('tilling' was "
                   "unexpected)"),
    (_unknown_tiling_key, "config: tiling: Additional properties are not allowed "
                          "('mpp_target' was unexpected)"),
    (_tiling_unlike_training, "config: tiling.mpp is 0.5 but federation (proxyfl) trains on 1.0"),
    (_bad_override, "config: federation (proxyfl): --set dp.noise=2: unknown key 'dp.noise'"),
    (_missing_federation_config, "config: federation.config: {tmp}/slides.yaml: no such file"),
    (_demo_hospitals_mismatch, "config: demo_cohort.hospitals is 3 but hospitals names 2"),
    (_no_heatmaps, "config: report.heatmaps_per_hospital: 0 is less than the minimum of 1"),
])
def test_a_misconfigured_cohort_fails_before_any_job(tmp_path, cohort, break_it, message):
    break_it(cohort, tmp_path)
    run = dry_run(tmp_path, write(tmp_path, cohort))
    assert run.returncode == 1
    lines = [line for line in run.stdout.splitlines() if line.startswith("config: ")]
    assert len(lines) == 1 and lines[0].startswith(message.format(tmp=tmp_path)), run.stdout
    assert "Building DAG" not in run.stdout  # refused while reading the Snakefile
    assert not (tmp_path / "results").exists()


def test_tiling_becomes_preprocess_options():
    assert preprocess_options({"mpp": 0.5, "ignore_unclassified": True, "fill_mpp": 0.25,
                               "tumour_class": ["Tumor", "Tumour region"]}) == (
        "--mpp 0.5 --ignore-unclassified --fill-mpp 0.25 --tumour-class Tumor "
        "--tumour-class 'Tumour region'")
    assert preprocess_options({"ignore_unclassified": False}) == ""


def test_the_slides_a_list_names_are_inputs_when_they_exist(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"slide")
    (tmp_path / "a.geojson").write_text("{}")
    (tmp_path / "labels.csv").write_text(
        "slide_id,path,label,annotation\na,a.svs,1,a.geojson\nb,b.svs,0,\n")
    # b.svs is missing: preprocessing records it as a failed slide, the workflow goes on.
    assert slide_files(str(tmp_path / "labels.csv"), None) == [
        str(tmp_path / "a.svs"), str(tmp_path / "a.geojson")]
    assert slide_files(str(tmp_path / "folder"), None) == []  # not written yet

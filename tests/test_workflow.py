"""The Snakemake workflow end to end on a tiny synthetic cohort: cohort, per-hospital jobs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import yaml

from wsi.bag import check_bag, read_labels

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


@pytest.mark.slow
def test_snakemake_runs_the_demo_workflow_on_a_tiny_cohort(tmp_path):
    out = tmp_path / "results"
    hospitals = {h: str(out / "cohort" / h / "labels.csv") for h in ("hospital_a", "hospital_b")}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(out),
        "demo_cohort": {"hospitals": 2, "slides_per_hospital": [2, 2], "seed": 3,
                        "size_um": 512},
        "hospitals": hospitals,
        "tiling": {"mpp": 1.0, "patch_size": 64, "min_tissue": 0.5},
        "preprocess_workers": 2,
    }))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-c2",
               "--configfile", str(config), "-q"]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for hospital in hospitals:  # only the configured hospitals, not the demo config's others
        rows = list(csv.DictReader((out / "preprocessed" / hospital / "manifest.csv").open()))
        assert [r["status"] for r in rows] == ["ok", "ok"]
        for row in rows:
            bag = out / "preprocessed" / hospital / "bags" / f"{row['slide_id']}.h5"
            assert check_bag(bag) == int(row["n_patches"]) > 0
            with h5py.File(bag, "r") as f:  # labels.csv names each slide's annotation
                labels = read_labels(f)
            assert labels.source == "annotation"
            assert labels.tumour.any() == (row["label"] == "1")
    assert not (out / "preprocessed" / "hospital_c").exists()
    again = subprocess.run([*command, "-n"], cwd=REPO, env=env, capture_output=True, text=True)
    assert "Nothing to be done" in again.stdout + again.stderr

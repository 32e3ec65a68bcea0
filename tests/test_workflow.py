"""The Snakemake workflow end to end on a tiny synthetic cohort: cohort, per-hospital jobs,
federation (one MPI job per algorithm) and slide-level evaluation."""

from __future__ import annotations

import csv
import json
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
        "demo_cohort": {"hospitals": 2, "slides_per_hospital": [6, 6], "seed": 3,
                        "size_um": 512},
        "hospitals": hospitals,
        "tiling": {"mpp": 1.0, "patch_size": 64, "min_tissue": 0.5},
        "preprocess_workers": 2,
        "federation": {"config": str(REPO / "configs" / "slides_demo.yaml"),
                       "algorithms": ["proxyfl", "regular"],
                       "set": ["rounds=2", "eval_every=1", "slides.patches_per_slide=4",
                               "optim.batch_size=2"]},
    }))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-c2",
               "--configfile", str(config), "-q"]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for hospital in hospitals:  # only the configured hospitals, not the demo config's others
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
    for algorithm in ("proxyfl", "regular"):
        run_dir = out / "federation" / algorithm
        metrics = json.loads((run_dir / "slide_metrics.json").read_text())
        models = {"proxyfl": {"private", "proxy"}, "regular": {"private"}}[algorithm]
        assert set(metrics) == models
        test_slides = 0
        for hospital in hospitals:
            with (run_dir / "hospitals" / hospital / "splits.csv").open() as handle:
                splits = [row["split"] for row in csv.DictReader(handle)]
            assert len(splits) == 6 and set(splits) == {"train", "validation", "test"}
            test_slides += splits.count("test")
            assert {p.stem for p in (run_dir / "hospitals" / hospital / "models").glob("*.pt")
                    } == models
        for model in models:
            assert set(metrics[model]["hospitals"]) == set(hospitals)
            assert metrics[model]["pooled"]["slides"] == test_slides
    again = subprocess.run([*command, "-n"], cwd=REPO, env=env, capture_output=True, text=True)
    assert "Nothing to be done" in again.stdout + again.stderr

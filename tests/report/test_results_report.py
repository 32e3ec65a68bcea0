"""``slidefed results-report``: one self-contained page of a workflow's outputs, written here
by hand (two hospitals, one failed slide, a ProxyFL run) so that every number is known."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
import yaml
from browser import read_page, rendered_dom
from PIL import Image

from federation import run_files
from federation.evaluation.metrics import METRICS
from federation.privacy.statement import NON_PRIVATE, NOT_SHARED
from report.render import write_results_report
from slidefed.cli import main

HOSPITALS = ("hospital_a", "hospital_b")
MODELS = ("private", "proxy")
SLIDES = 4  # tiled slides per hospital, labels 0, 1, 0, 1; hospital_a has one failed slide more
FAILURE = "hospital_a_bad.svs: not a brightfield slide: 81% of the overview is dark"


def _csv(path: Path, columns: tuple[str, ...], rows: list[tuple]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)


def _png(path: Path, size: tuple[int, int] = (200, 150)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (210, 140, 190)).save(path)


def _summary(slides: int, auc: float | None) -> dict:
    metric = {"value": 0.75, "low": 0.5, "high": 1.0}
    return {"slides": slides, "tumour_slides": slides // 2,
            **{m: dict(metric) for m in METRICS},
            "auc": {"value": auc, "low": None if auc is None else 0.4, "high": 1.0}}


def write_outputs(out: Path) -> Path:
    """A workflow output directory as the Snakefile lays it out, after every rule."""
    for h in HOSPITALS:
        rows = [(f"{h}_{s}", f"/slides/{h}_{s}.svs", s % 2, "ok", 10 + s, 0.25, "file", "")
                for s in range(SLIDES)]
        if h == "hospital_a":
            rows.append(("hospital_a_bad", "/slides/hospital_a_bad.svs", 1, "failed", 0, "",
                         "", FAILURE))
        _csv(out / "preprocessed" / h / "manifest.csv", ("slide_id", "path", "label", "status",
             "n_patches", "mpp", "mpp_source", "error"), rows)
        for s in range(SLIDES):
            _png(out / "preprocessed" / h / "qc" / f"{h}_{s}.png")
    run = out / "federation" / "proxyfl"
    run.mkdir(parents=True)
    (run / run_files.CONFIG).write_text(yaml.safe_dump(
        {"algorithm": "proxyfl", "data": {"name": "bags", "hospitals": list(HOSPITALS)}}))
    _csv(run / run_files.METRICS, run_files.METRICS_COLUMNS,
         [(r, c, m, "validation", metric, 0.5 + 0.1 * r) for r in (1, 2, 3)
          for c in range(2) for m in MODELS for metric in ("accuracy", "auc")])
    _csv(run / run_files.PRIVACY, run_files.PRIVACY_COLUMNS,
         [(r, c, 1.5 * r + c, 1e-3, "slide", "active", "substitution", "theorem")
          for r in (1, 2, 3) for c in range(2)])
    _csv(run / run_files.SLIDE_PREDICTIONS, run_files.PREDICTION_COLUMNS,
         [(h, f"{h}_{s}", "test", s % 2, 0.2 + 0.2 * s, int(s >= 2), m)
          for h in HOSPITALS for m in MODELS for s in range(SLIDES)])
    (run / run_files.SLIDE_METRICS).write_text(json.dumps(
        {m: {"hospitals": {h: _summary(SLIDES, None if h == "hospital_b" else 0.9)
                           for h in HOSPITALS},
             "pooled": _summary(2 * SLIDES, 0.8)} for m in MODELS}))
    _csv(run / run_files.CROSS_SITE, (*run_files.CROSS_SITE_KEYS, *METRICS),
         [(a, "proxy", b, SLIDES, 0.9, 0.75, 0.75, 0.5, 1.0) for a in HOSPITALS
          for b in HOSPITALS])
    heatmaps = [(h, m, f"{h}_{s}", "test", s % 2, 0.3, 0, f"hospitals/{h}/heatmaps/{m}/{h}_{s}.png")
                for h in HOSPITALS for s in range(2) for m in MODELS]
    _csv(run / run_files.HEATMAPS, run_files.HEATMAP_COLUMNS, heatmaps)
    for row in heatmaps:
        _png(run / row[-1], (400, 300))
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = write_outputs(tmp_path_factory.mktemp("workflow") / "results")
    return write_results_report(out, workflow_config="output_dir: results/demo\n",
                                thumbnails=3)


def test_the_report_is_one_file_that_needs_nothing_else(report):
    html = report.read_text()
    page = read_page(html)
    assert report.name == "report.html" and not {"script", "link", "iframe"} & page.tags
    # Every link is an anchor of the page or an embedded picture, which decodes.
    assert all(link.startswith(("#", "data:image/")) for link in page.links)
    for image in page.images:
        header, data = image["src"].split(",", 1)
        assert header in ("data:image/png;base64", "data:image/jpeg;base64")
        with Image.open(io.BytesIO(base64.b64decode(data))) as picture:
            assert min(picture.size) > 0
    alts = [image["alt"] for image in page.images]
    # 3 QC pictures of each hospital (--thumbnails), 8 heatmaps, training and privacy plots
    # of the run, one ROC figure.
    assert sum(a.startswith("QC picture") for a in alts) == 3 * len(HOSPITALS)
    assert sum(a.startswith("heatmap of") for a in alts) == 8
    assert len(alts) == 3 * 2 + 8 + 3
    assert "output_dir: results/demo" in html  # the workflow configuration
    assert "<th>slidefed</th>" in html and "<th>torch</th>" in html  # the software


def test_the_tables_hold_each_hospital_and_the_failure_reason(report):
    tables = read_page(report.read_text()).tables
    cohort = dict(tables["cohort-table"])
    assert list(cohort) == list(HOSPITALS)
    # hospital, slides, tumour slides, tiled, patches, failed, reasons
    assert cohort["hospital_a"][:6] == ["hospital_a", "5", "3", "4", "46", "1"]
    assert cohort["hospital_a"][6] == f"hospital_a_bad: {FAILURE}"
    assert cohort["hospital_b"][5:] == ["0", "none"]
    metrics = tables["slide-metrics-table"]
    assert [(h, cells[2]) for h, cells in metrics] == [
        (h, m) for h in (*HOSPITALS, "pooled") for m in MODELS]
    by_scope = {(h, cells[2]): cells for h, cells in metrics}
    assert by_scope["hospital_a", "proxy"][5] == "0.900 [0.400, 1.000]"  # AUC and interval
    assert by_scope["hospital_b", "proxy"][5] == "—"  # undefined: one class
    cross_site = tables["cross-site-table:proxyfl"]
    assert [(h, cells) for h, cells in cross_site] == [
        (h, [h, "0.900 / 0.750", "0.900 / 0.750"]) for h in HOSPITALS]
    final_epsilon = dict(tables["final-epsilon:proxyfl"])
    assert final_epsilon == {"hospital_a": ["hospital_a", "4.500"],
                             "hospital_b": ["hospital_b", "5.500"]}
    # what the ε means, in words, beside it
    assert "What this ε is: (ε, δ)-DP per slide, replace-one." in report.read_text()


def test_a_run_not_yet_evaluated_is_one_line_naming_the_file(tmp_path, capsys):
    out = write_outputs(tmp_path / "results")
    write_results_report(out)
    before = (out / "report.html").read_bytes()
    (out / "federation" / "proxyfl" / run_files.SLIDE_METRICS).unlink()
    assert main(["results-report", str(out)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert f"{out / 'federation' / 'proxyfl' / 'slide_metrics.json'}: missing" in error
    # The report of before is left whole, and no partial file is left beside it.
    assert (out / "report.html").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["federation", "preprocessed", "report.html"]


def test_the_command_reads_the_workflow_config_from_stdin(tmp_path, monkeypatch, capsys):
    out = write_outputs(tmp_path / "results")
    monkeypatch.setattr("sys.stdin", io.StringIO("hospitals:\n  hospital_a: a.csv\n"))
    target = tmp_path / "elsewhere" / "page.html"
    assert main(["results-report", str(out), "--workflow-config", "-", "-o", str(target)]) == 0
    assert str(target) in capsys.readouterr().out
    assert "hospital_a: a.csv" in target.read_text()
    assert main(["results-report", str(out), "--run", "fedavg"]) == 1
    assert f"{out / 'federation' / 'fedavg'}: no such run" in capsys.readouterr().err
    assert main(["results-report", str(tmp_path)]) == 1  # not a workflow's output_dir
    assert f"{tmp_path}: no preprocessed/<hospital>/manifest.csv" in capsys.readouterr().err


def test_chromium_renders_every_picture_and_the_check_catches_a_broken_one(
        report, chromium, tmp_path):
    dom, check = rendered_dom(chromium, report, tmp_path)
    assert check == {"images": 17, "broken": []}
    assert [h for h, _ in read_page(dom).tables["cohort-table"]] == list(HOSPITALS)
    broken = tmp_path / "broken.html"
    broken.write_text('<html><body><img alt="bad" src="data:image/png;base64,AAAA">'
                      f'<img alt="good" src="{read_page(dom).images[0]["src"]}"></body></html>')
    assert rendered_dom(chromium, broken, tmp_path)[1] == {"images": 2, "broken": ["bad"]}


def test_shared_statistics_are_labelled_and_a_run_that_shared_none_says_so(tmp_path):
    out = write_outputs(tmp_path / "results")
    html = write_results_report(out).read_text()
    assert html.count(NON_PRIVATE) >= 4  # training, ROC, slide-level metrics, cross-site
    assert "training-not-shared" not in html
    _csv(out / "federation" / "proxyfl" / run_files.METRICS, run_files.METRICS_COLUMNS, [])
    html = write_results_report(out).read_text()  # the default: hospitals shared no metric
    assert 'class="note training-not-shared"' in html and f"metrics {NOT_SHARED}" in html
    alts = [image["alt"] for image in read_page(html).images]
    assert not any(a.startswith("training curves") for a in alts)
    assert any(a.startswith("privacy spent") for a in alts)  # ε: the DP release, always there

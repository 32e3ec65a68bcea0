"""``slidefed compare RUN_A RUN_B``: two evaluated runs (or two models of one run) compared on
the same test slides, per hospital and overall, with paired tests (``federation.evaluation.
paired``: DeLong for AUC, a hospital × label stratified paired bootstrap for accuracy,
sensitivity and specificity at each model's own thresholds).

Usage::

    slidefed evaluate RUN_A && slidefed evaluate RUN_B
    slidefed compare RUN_A RUN_B                          # each run's reported model
    slidefed compare RUN_A RUN_B --model private --model-b proxy -o a_vs_b.json
    slidefed compare RUN --model private --model-b proxy  # two models of one run

Each run's test-slide rows come from its ``slide_predictions.csv`` (``slidefed evaluate``), or,
where only hospitals were evaluated (``--hospital``), from each ``hospitals/<h>/
slide_predictions.csv``. ``--model`` picks the model of A (default: the run's reported model,
``summary.json``, or its only model) and ``--model-b`` that of B (default: ``--model`` when
given, else B's reported model). The comparison is refused, in one line naming both files,
unless both runs hold the same hospitals and, in each, the same test slides with the same
labels: a paired comparison on different slides would not be one.

The table gives, per hospital and overall, each model's AUC, Δ = A − B with its 95 % interval
and two-sided p-value (DeLong), then the differences in accuracy, sensitivity and specificity
(bootstrap). Overall AUCs and Δ are slide-weighted means of the hospitals' (never one AUC
over scores pooled across hospitals); the JSON (``-o``) adds the pair-weighted stratified AUC,
each hospital's weight, and a ``reason`` wherever a figure is not computable. The figures are
computed on hospitals' test slides and are not covered by DP: they pool what each hospital's
evaluation wrote (``federation.run_files``).
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from federation import run_files
from federation.evaluation.paired import (
    BOOTSTRAP_METRICS,
    WEIGHTINGS,
    Combined,
    DeLong,
    Difference,
    combine_hospitals,
    delong_paired,
    paired_bootstrap,
)
from formats.atomic import atomic_path

TEST = "test"


class CompareInputError(ValueError):
    """Runs that cannot be compared; ``str()`` is one line naming the file(s)."""


@dataclass(frozen=True)
class Slide:
    label: int
    score: float
    call: int


@dataclass(frozen=True)
class Predictions:
    """One model's test slides of one run: ``{hospital: {slide_id: Slide}}``."""

    run_dir: Path
    model: str
    files: tuple[Path, ...]
    slides: dict[str, dict[str, Slide]]

    @property
    def where(self) -> str:
        return ", ".join(str(f) for f in self.files)


def prediction_files(run_dir: Path) -> list[Path]:
    """The run's slide-prediction files: the run-level one, else every hospital's."""
    run_level = run_dir / run_files.SLIDE_PREDICTIONS
    if run_level.is_file():
        return [run_level]
    files = sorted((run_dir / run_files.HOSPITALS).glob(f"*/{run_files.SLIDE_PREDICTIONS}"))
    if not files:
        raise CompareInputError(f"{run_level}: missing, and no {run_files.HOSPITALS}/<hospital>/"
                                f"{run_files.SLIDE_PREDICTIONS}; run `slidefed evaluate "
                                f"{run_dir}` first")
    return files


def _reported_model(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / run_files.SUMMARY).read_text()).get("reported_model")
    except (OSError, ValueError, AttributeError):
        return None


def read_predictions(run_dir: str | Path, model: str | None = None) -> Predictions:
    """The test-slide predictions of ``model`` (default: the reported, or only, model)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CompareInputError(f"{run_dir}: no such run directory")
    files = prediction_files(run_dir)
    rows: list[tuple[Path, int, dict[str, str]]] = []
    for path in files:
        try:
            rows += [(path, line, row) for line, row in
                     run_files.read_rows(path, run_files.PREDICTION_COLUMNS)]
        except (UnicodeDecodeError, OSError) as error:
            raise CompareInputError(f"{path}: unreadable ({error})") from None
        except ValueError as error:  # csv.Error is one; the header message names the file
            message = str(error)
            raise CompareInputError(message if message.startswith(str(path))
                                    else f"{path}: {message}") from None
    tested = [(p, line, row) for p, line, row in rows if row["split"] == TEST]
    models = sorted({row["model"] for _, _, row in tested})
    where = ", ".join(str(f) for f in files)
    if not models:
        raise CompareInputError(f"{where}: no {TEST} slides")
    if model is None:
        reported = _reported_model(run_dir)
        if reported in models:
            model = reported
        elif len(models) == 1:
            model = models[0]
        else:
            raise CompareInputError(f"{where}: models {', '.join(models)}; say which with "
                                    f"--model/--model-b")
    elif model not in models:
        raise CompareInputError(f"{where}: no {TEST} slides of model {model!r} (models: "
                                f"{', '.join(models)})")
    slides: dict[str, dict[str, Slide]] = {}
    for path, line, row in tested:
        if row["model"] != model:
            continue
        try:
            label, call, score = int(row["label"]), int(row["prediction"]), float(row["score"])
        except ValueError:
            raise CompareInputError(f"{path}:{line}: label, prediction or score is not a "
                                    f"number") from None
        if label not in (0, 1) or call not in (0, 1) or not math.isfinite(score):
            raise CompareInputError(f"{path}:{line}: label and prediction must be 0 or 1 and "
                                    f"score finite")
        hospital = slides.setdefault(row["hospital"], {})
        if row["slide_id"] in hospital:
            raise CompareInputError(f"{path}:{line}: slide {row['slide_id']} of "
                                    f"{row['hospital']} twice for model {model}")
        hospital[row["slide_id"]] = Slide(label, score, call)
    return Predictions(run_dir, model, tuple(files), slides)


def check_same_slides(a: Predictions, b: Predictions) -> None:
    """Refuse (``CompareInputError``, one line naming both runs' files) unless A and B hold the
    same hospitals and, in each, the same test slides with the same labels."""
    both = f"{a.where} ({a.model}) and {b.where} ({b.model})"
    if set(a.slides) != set(b.slides):
        only_a = sorted(set(a.slides) - set(b.slides))
        only_b = sorted(set(b.slides) - set(a.slides))
        raise CompareInputError(f"{both}: not the same hospitals (only in A: "
                                f"{', '.join(only_a) or 'none'}; only in B: "
                                f"{', '.join(only_b) or 'none'}); not a paired comparison")
    for hospital in sorted(a.slides):
        sa, sb = a.slides[hospital], b.slides[hospital]
        if set(sa) != set(sb):
            only_a, only_b = sorted(set(sa) - set(sb)), sorted(set(sb) - set(sa))
            raise CompareInputError(
                f"{both}: {hospital}'s test slides differ ({len(only_a)} only in A"
                f"{', e.g. ' + only_a[0] if only_a else ''}; {len(only_b)} only in B"
                f"{', e.g. ' + only_b[0] if only_b else ''}); not a paired comparison")
        relabelled = sorted(s for s in sa if sa[s].label != sb[s].label)
        if relabelled:
            s = relabelled[0]
            raise CompareInputError(
                f"{both}: {hospital}'s test slides are labelled differently ({len(relabelled)} "
                f"slides, e.g. {s}: {sa[s].label} in A, {sb[s].label} in B); not a paired "
                f"comparison")


def compare(a: Predictions, b: Predictions, *, n_bootstrap: int = 2000, seed: int = 0
            ) -> dict[str, Any]:
    """The paired comparison of A and B, as JSON-ready ``{"a", "b", "hospitals",
    "overall", ...}`` (module docstring)."""
    check_same_slides(a, b)
    hospitals = sorted(a.slides)
    names, labels, calls_a, calls_b = [], [], [], []
    delong: dict[str, DeLong] = {}
    for hospital in hospitals:
        ids = sorted(a.slides[hospital])
        y = [a.slides[hospital][s].label for s in ids]
        delong[hospital] = delong_paired(y, [a.slides[hospital][s].score for s in ids],
                                         [b.slides[hospital][s].score for s in ids])
        names += [hospital] * len(ids)
        labels += y
        calls_a += [a.slides[hospital][s].call for s in ids]
        calls_b += [b.slides[hospital][s].call for s in ids]
    boot = paired_bootstrap(names, labels, calls_a, calls_b, n_bootstrap=n_bootstrap, seed=seed)
    combined = {w: combine_hospitals(delong, w) for w in WEIGHTINGS}
    y = np.asarray(labels)
    result: dict[str, Any] = {
        "a": {"run": str(a.run_dir), "model": a.model, "files": [str(f) for f in a.files]},
        "b": {"run": str(b.run_dir), "model": b.model, "files": [str(f) for f in b.files]},
        "bootstrap": {"resamples": n_bootstrap, "seed": seed, "strata": "hospital x label"},
        "hospitals": {},
        "overall": {
            "slides": len(y), "tumour_slides": int(y.sum()),
            "auc": combined["slides"].as_dict(),
            "stratified_auc_pairs": combined["pairs"].as_dict(),
            **{m: boot["overall"][m].as_dict() for m in BOOTSTRAP_METRICS},
        },
    }
    for hospital in hospitals:
        r = delong[hospital]
        result["hospitals"][hospital] = {
            "slides": r.positives + r.negatives, "tumour_slides": r.positives,
            "auc": r.as_dict(), **{m: boot[hospital][m].as_dict() for m in BOOTSTRAP_METRICS}}
    return result


def compare_runs(run_a: str | Path, run_b: str | Path, model_a: str | None = None,
                 model_b: str | None = None, *, output: str | Path | None = None,
                 n_bootstrap: int = 2000, seed: int = 0) -> dict[str, Any]:
    """``slidefed compare``: read both runs, compare, write ``output`` (JSON) if given."""
    a = read_predictions(run_a, model_a)
    b = read_predictions(run_b, model_b if model_b is not None else model_a)
    result = compare(a, b, n_bootstrap=n_bootstrap, seed=seed)
    if output is not None:
        with atomic_path(Path(output)) as path:
            path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _p(p: float | None) -> str:
    return "—" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"


def _auc_cells(r: DeLong | Combined) -> str:
    if r.auc_a is None:
        return f"{'—':>6} {'—':>6}  not computable: {r.reason}"
    interval = (f"[{_num(r.low, True)}, {_num(r.high, True)}]" if r.low is not None
                else "not computable")
    return (f"{r.auc_a:6.3f} {r.auc_b:6.3f} {_num(r.delta, True):>7} {interval:<17} "
            f"{_p(r.p):>6}")


def _difference_cell(d: Difference) -> str:
    if d.delta is None:
        return "—"
    interval = (f"[{_num(d.low, True)}, {_num(d.high, True)}]" if d.low is not None
                else "not computable")
    return f"{_num(d.delta, True)} {interval:<17} {_p(d.p):>6}"


def format_table(result: Mapping[str, Any]) -> str:
    """The comparison as text: an AUC block and a threshold-metrics block, then the notes."""
    a, b = result["a"], result["b"]
    scopes = [*result["hospitals"].items(), ("overall", result["overall"])]
    width = max(8, *(len(s) for s, _ in scopes))
    lines = [f"A: {a['run']} ({a['model']})", f"B: {b['run']} ({b['model']})", "",
             f"{'hospital':<{width}} {'slides':>12}  {'AUC A':>6} {'AUC B':>6} {'ΔAUC':>7} "
             f"{'95% CI (DeLong)':<17} {'p':>6}"]
    notes: list[str] = []
    for scope, r in scopes:
        auc = r["auc"]
        obj = (Combined if scope == "overall" else DeLong)(**auc)
        slides = f"{r['slides']} ({r['tumour_slides']} T)"
        lines.append(f"{scope:<{width}} {slides:>12}  {_auc_cells(obj)}")
        if obj.reason and obj.auc_a is not None:
            notes.append(f"{scope}: {obj.reason}")
        if scope == "overall" and obj.left_out:
            notes.append("overall AUC: left out " + "; ".join(
                f"{h} ({why})" for h, why in obj.left_out.items()))
    short = {"accuracy": "Δacc", "sensitivity": "Δsens", "specificity": "Δspec"}
    lines += ["", f"{'hospital':<{width}} " + "  ".join(
        f"{short[m]:>6} {'95% CI (bootstrap)':<17} {'p':>6}" for m in BOOTSTRAP_METRICS)]
    for scope, r in scopes:
        cells = []
        for m in BOOTSTRAP_METRICS:
            d = Difference(**r[m])
            cells.append(f"{_difference_cell(d):<31}")
            if d.reason:
                notes.append(f"{scope} {m}: {d.reason}")
        lines.append((f"{scope:<{width}} " + "  ".join(cells)).rstrip())
    boot = result["bootstrap"]
    pairs = result["overall"]["stratified_auc_pairs"]
    stratified = (f"pair-weighted stratified AUC {pairs['auc_a']:.3f} vs {pairs['auc_b']:.3f}"
                  if pairs["auc_a"] is not None else "no pair-weighted stratified AUC")
    lines += ["", *textwrap.wrap(
        "Δ = A − B on the same test slides. Overall AUC and ΔAUC: slide-weighted means of the "
        "hospitals' (DeLong variances combined, hospitals independent; scores never pooled "
        f"across hospitals); {stratified}. Δacc, Δsens, Δspec: accuracy, sensitivity and "
        f"specificity at each model's own thresholds, {boot['resamples']} paired bootstrap "
        f"resamples within hospital x label strata (seed {boot['seed']}), percentile "
        "intervals. p-values two-sided, not adjusted for multiplicity.", 96)]
    if notes:
        lines += ["", *(f"note: {n}" for n in notes)]
    return "\n".join(lines)

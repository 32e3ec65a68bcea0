"""Paired comparisons (``federation.evaluation.paired``, ``slidefed compare``): DeLong against
its definition computed by brute force, scikit-learn's AUC and a null simulation; the
combination across hospitals by hand; the stratified paired bootstrap; the command end to end
on prediction files written here, and its refusals."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy.stats import kstest
from sklearn.metrics import roc_auc_score

from federation.evaluation.compare import (
    CompareInputError,
    compare_runs,
    format_table,
    read_predictions,
)
from federation.evaluation.paired import (
    DeLong,
    bootstrap_p,
    combine_hospitals,
    delong_paired,
    paired_bootstrap,
)
from federation.run_files import PREDICTION_COLUMNS
from slidefed.cli import main


def _psi(x: float, y: float) -> float:
    return 1.0 if x > y else 0.5 if x == y else 0.0


def _delong_by_definition(labels, scores_a, scores_b):
    """AUCs and Var(AUC_A − AUC_B) from DeLong et al. (1988) by explicit loops over pairs."""
    positives = [i for i, label in enumerate(labels) if label == 1]
    negatives = [j for j, label in enumerate(labels) if label == 0]
    m, n = len(positives), len(negatives)
    v10, v01, auc = [], [], []
    for s in (scores_a, scores_b):
        v10.append([sum(_psi(s[i], s[j]) for j in negatives) / n for i in positives])
        v01.append([sum(_psi(s[i], s[j]) for i in positives) / m for j in negatives])
        auc.append(sum(_psi(s[i], s[j]) for i in positives for j in negatives) / (m * n))

    def covariance(v, k, ell, size):
        return sum((v[k][i] - auc[k]) * (v[ell][i] - auc[ell]) for i in range(size)) / (size - 1)

    s = [[covariance(v10, k, ell, m) / m + covariance(v01, k, ell, n) / n for ell in (0, 1)]
         for k in (0, 1)]
    return auc[0], auc[1], s[0][0] + s[1][1] - 2 * s[0][1], s[0][0], s[1][1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_variance_is_its_definition_computed_by_brute_force(seed) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 41)
    # Rounded to one decimal: many ties within and across classes, and across the models.
    latent = rng.normal(size=41) + labels
    a = np.round(latent + rng.normal(size=41), 1) / 4
    b = np.round(latent + 2 * rng.normal(size=41), 0)
    assert len(np.unique(a)) < 41 and len(np.unique(b)) < 41
    auc_a, auc_b, variance, var_a, var_b = _delong_by_definition(labels, a, b)
    r = delong_paired(labels, a, b)
    assert (r.positives, r.negatives) == (int(labels.sum()), int((1 - labels).sum()))
    assert r.auc_a == pytest.approx(auc_a, abs=1e-12)
    assert r.auc_b == pytest.approx(auc_b, abs=1e-12)
    assert r.delta == pytest.approx(auc_a - auc_b, abs=1e-12)
    assert r.variance == pytest.approx(variance, rel=1e-10)
    assert (r.se_a, r.se_b) == pytest.approx((math.sqrt(var_a), math.sqrt(var_b)), rel=1e-10)
    assert r.se == pytest.approx(math.sqrt(variance))
    assert (r.low, r.high) == pytest.approx((r.delta - 1.959964 * r.se,
                                             r.delta + 1.959964 * r.se), rel=1e-6)
    assert r.reason is None


def test_delong_auc_is_scikit_learns() -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 200)
    a = np.round(rng.normal(size=200) + labels, 1)
    b = rng.integers(0, 5, 200)  # heavy ties
    r = delong_paired(labels, a, b)
    assert r.auc_a == pytest.approx(roc_auc_score(labels, a), abs=1e-12)
    assert r.auc_b == pytest.approx(roc_auc_score(labels, b), abs=1e-12)


def test_a_hand_computed_example() -> None:
    # Tumour slides score 0.8, 0.6; normal 0.6, 0.2. A: pairs (.8>.6, .8>.2, .6=.6, .6>.2)
    # = 3.5/4. B reverses the two middle slides' scores: AUC 1.0.
    labels = [1, 1, 0, 0]
    r = delong_paired(labels, [0.8, 0.6, 0.6, 0.2], [0.8, 0.7, 0.5, 0.2])
    assert (r.auc_a, r.auc_b, r.delta) == (0.875, 1.0, -0.125)
    # V10_A = (1, .75), V10_B = (1, 1); V01_A = (.75, 1), V01_B = (1, 1): differences
    # (0, -.25) and (-.25, 0), each of variance .03125: Var = .03125/2 + .03125/2.
    assert r.variance == pytest.approx(0.03125)
    assert r.se_b is None  # B's own variance is 0 (perfect), the difference's is not


def test_p_values_are_uniform_under_the_null_and_small_under_an_alternative() -> None:
    rng = np.random.default_rng(2024)
    null, alternative = [], []
    for _ in range(300):
        labels = np.repeat([0, 1], 30)
        latent = rng.normal(size=60) + 1.2 * labels  # both models see the same slides
        null.append(delong_paired(labels, latent + rng.normal(size=60),
                                  latent + rng.normal(size=60)).p)
        alternative.append(delong_paired(labels, latent + 0.3 * rng.normal(size=60),
                                         latent + 3.0 * rng.normal(size=60)).p)
    null = np.array(null)
    assert 0.02 <= (null < 0.05).mean() <= 0.09
    assert kstest(null, "uniform").pvalue > 0.01
    assert np.median(alternative) < 0.05


@pytest.mark.parametrize(("labels", "a", "b", "reason"), [
    ([1, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1], "one class only (no normal slides)"),
    ([0, 0], [0.1, 0.2], [0.3, 0.2], "one class only (no tumour slides)"),
    ([1, 0, 0], [0.9, 0.2, 0.3], [0.3, 0.2, 0.1], "at least 2 tumour and 2 normal"),
    ([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.3], [0.7, 0.6, 0.1, 0.5], "both AUCs 1.0"),
    ([1, 1, 0, 0], [0.9, 0.4, 0.2, 0.5], [0.8, 0.3, 0.1, 0.4], "rank the slides alike"),
])
def test_not_computable_is_marked_not_degenerate(labels, a, b, reason) -> None:
    r = delong_paired(labels, a, b)
    assert reason in r.reason
    assert r.low is None and r.high is None and r.p is None and r.se is None
    if "both AUCs" in reason:
        assert (r.auc_a, r.auc_b, r.delta, r.variance) == (1.0, 1.0, 0.0, 0.0)


def test_delong_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="0 or 1"):
        delong_paired([0, 2], [0.1, 0.2], [0.1, 0.2])
    with pytest.raises(ValueError, match="shape"):
        delong_paired([0, 1], [0.1, 0.2], [0.1])


def _result(m, n, auc_a, auc_b, variance):
    return DeLong(m, n, auc_a, auc_b, auc_a - auc_b, variance, None, None, None, None)


def test_hospitals_combine_as_a_weighted_mean_with_independent_variances() -> None:
    results = {"h1": _result(4, 6, 0.9, 0.8, 0.01),          # 10 slides, 24 pairs
               "h2": _result(10, 20, 0.7, 0.75, 0.004),      # 30 slides, 200 pairs
               "h3": DeLong(3, 0, None, None, None, None, None, None, None, None,
                            reason="one class only (no normal slides)")}
    c = combine_hospitals(results)
    assert c.weights == pytest.approx({"h1": 0.25, "h2": 0.75})
    assert c.left_out == {"h3": "one class only (no normal slides)"}
    assert c.auc_a == pytest.approx(0.25 * 0.9 + 0.75 * 0.7)
    assert c.auc_b == pytest.approx(0.25 * 0.8 + 0.75 * 0.75)
    assert c.delta == pytest.approx(0.25 * 0.1 - 0.75 * 0.05)  # -0.0125
    assert c.variance == pytest.approx(0.0625 * 0.01 + 0.5625 * 0.004)  # 0.002875
    assert c.se == pytest.approx(math.sqrt(0.002875))
    assert c.p == pytest.approx(2 * (1 - 0.5 * (1 + math.erf(0.0125 / c.se / math.sqrt(2)))))
    pairs = combine_hospitals(results, "pairs")
    assert pairs.weights == pytest.approx({"h1": 24 / 224, "h2": 200 / 224})
    assert pairs.delta == pytest.approx((24 * 0.1 - 200 * 0.05) / 224)
    assert pairs.variance == pytest.approx((24 / 224) ** 2 * 0.01 + (200 / 224) ** 2 * 0.004)


def test_combination_of_one_hospital_is_that_hospital_and_of_zeros_is_marked() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 30)
    a, b = rng.normal(size=30) + labels, rng.normal(size=30)
    alone = delong_paired(labels, a, b)
    c = combine_hospitals({"h": alone})
    assert (c.delta, c.variance, c.p) == pytest.approx((alone.delta, alone.variance, alone.p))
    perfect = delong_paired([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.3], [0.7, 0.6, 0.1, 0.5])
    zero = combine_hospitals({"h1": perfect, "h2": perfect})
    assert zero.delta == 0.0 and zero.low is None and "not computable" in zero.reason
    assert combine_hospitals({}).reason == "no hospital with a DeLong variance"


def test_bootstrap_resamples_within_hospital_and_label() -> None:
    # A is right on every slide; B calls every slide tumour. Within hospital x label strata
    # the differences are the same in every resample (sensitivity 0, specificity 1, accuracy
    # the share of normal slides, fixed by the strata): nothing to put an interval on. An
    # unstratified bootstrap would vary the share of normal slides, and so the accuracy.
    hospitals = ["h1"] * 6 + ["h2"] * 4
    labels = [1, 1, 0, 0, 0, 0, 1, 0, 1, 1]
    r = paired_bootstrap(hospitals, labels, labels, [1] * 10, n_bootstrap=200, seed=1)
    assert set(r) == {"h1", "h2", "overall"}
    assert r["h1"]["accuracy"].delta == pytest.approx(4 / 6)
    assert r["overall"]["accuracy"].delta == pytest.approx(5 / 10)
    for scope in r.values():
        assert scope["sensitivity"].delta == 0.0
        assert "differ on no tumour slide" in scope["sensitivity"].reason
        assert scope["specificity"].delta == 1.0
        assert "every resample gives the same difference" in scope["specificity"].reason
        assert scope["accuracy"].low is None and scope["accuracy"].p is None


def test_bootstrap_interval_p_value_and_seed() -> None:
    rng = np.random.default_rng(5)
    hospitals = np.repeat(["h1", "h2", "h3"], [40, 60, 30])
    labels = rng.integers(0, 2, 130)
    right_a = rng.random(130) < 0.9  # A right on ~90 %, B on ~60 % of the slides
    right_b = rng.random(130) < 0.6
    calls_a = np.where(right_a, labels, 1 - labels)
    calls_b = np.where(right_b, labels, 1 - labels)
    r = paired_bootstrap(hospitals, labels, calls_a, calls_b, n_bootstrap=500, seed=0)
    overall = r["overall"]["accuracy"]
    assert overall.a == pytest.approx((calls_a == labels).mean())
    assert overall.delta == pytest.approx((calls_a == labels).mean() - (calls_b == labels).mean())
    assert overall.low < overall.delta < overall.high
    assert overall.p == pytest.approx(2 / 501)  # no resample at or below 0
    sens = r["h2"]["sensitivity"]
    tumour = (hospitals == "h2") & (labels == 1)
    assert sens.a == pytest.approx((calls_a[tumour] == 1).mean())
    assert r == paired_bootstrap(hospitals, labels, calls_a, calls_b, n_bootstrap=500, seed=0)
    assert r != paired_bootstrap(hospitals, labels, calls_a, calls_b, n_bootstrap=500, seed=1)
    # Same calls for B as for A: the difference is 0 on every slide.
    same = paired_bootstrap(hospitals, labels, calls_a, calls_a, n_bootstrap=50)
    assert same["overall"]["accuracy"].delta == 0.0
    assert "differ on no slide" in same["overall"]["accuracy"].reason


def test_bootstrap_p_counts_ties_on_both_sides() -> None:
    assert bootstrap_p(np.zeros(99)) == 1.0
    assert bootstrap_p(np.full(99, 0.1)) == pytest.approx(2 / 100)
    assert bootstrap_p(np.array([-0.1] * 10 + [0.1] * 89)) == pytest.approx(22 / 100)


def test_a_hospital_with_one_class_has_no_sensitivity_or_specificity() -> None:
    r = paired_bootstrap(["h"] * 3, [1, 1, 1], [1, 0, 1], [1, 1, 1], n_bootstrap=20)
    assert r["h"]["specificity"].reason == "no normal slides"
    assert r["h"]["specificity"].delta is None
    assert r["h"]["sensitivity"].delta == pytest.approx(-1 / 3)


# --- slidefed compare -----------------------------------------------------------------------

def _write_run(directory, rows, *, per_hospital=False, reported=None):
    """A run directory holding ``slide_predictions.csv`` rows (hospital, slide_id, split,
    label, score, prediction, model), run-level or under ``hospitals/<h>/``."""
    directory.mkdir(parents=True)
    if reported:
        (directory / "summary.json").write_text(json.dumps({"reported_model": reported}))
    groups = ({h: [r for r in rows if r[0] == h] for h in {r[0] for r in rows}}
              if per_hospital else {None: rows})
    for hospital, group in groups.items():
        path = (directory / "hospitals" / hospital if hospital else directory)
        path.mkdir(parents=True, exist_ok=True)
        with open(path / "slide_predictions.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(PREDICTION_COLUMNS)
            writer.writerows(group)
    return directory


def _cohort(seed, sizes=(("alpha", 24), ("beta", 16))):
    """Slides of two hospitals, their labels, and scores of a good and a weaker model."""
    rng = np.random.default_rng(seed)
    slides = []
    for hospital, size in sizes:
        for k in range(size):
            label = k % 2
            latent = rng.normal() + 1.5 * label
            slides.append((hospital, f"{hospital}-{k:02d}", label,
                           1 / (1 + math.exp(-(latent + 0.3 * rng.normal()))),
                           1 / (1 + math.exp(-(latent + 1.5 * rng.normal())))))
    return slides


def _rows(slides, model, column, split="test"):
    rows = []
    for hospital, slide, label, *scores in slides:
        score = scores[column]
        rows.append((hospital, slide, split, label, repr(score), int(score >= 0.5), model))
        rows.append((hospital, slide + "v", "validation", label, "0.5", 1, model))
    return rows


def test_compare_two_runs_end_to_end(tmp_path, capsys) -> None:
    slides = _cohort(0)
    run_a = _write_run(tmp_path / "a", _rows(slides, "private", 0) + _rows(slides, "proxy", 1),
                       reported="private")
    run_b = _write_run(tmp_path / "b", _rows(slides, "proxy", 1), per_hospital=True)
    out = tmp_path / "cmp" / "a_vs_b.json"
    assert main(["compare", str(run_a), str(run_b), "--model-b", "proxy", "-o", str(out),
                 "--bootstrap", "300"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["a"]["model"] == "private" and result["b"]["model"] == "proxy"
    assert result["b"]["files"] == [str(run_b / "hospitals" / h / "slide_predictions.csv")
                                    for h in ("alpha", "beta")]
    for hospital in ("alpha", "beta"):
        mine = [s for s in slides if s[0] == hospital]
        labels = [s[2] for s in mine]
        expected = delong_paired(labels, [s[3] for s in mine], [s[4] for s in mine])
        got = result["hospitals"][hospital]
        assert got["auc"] == pytest.approx(expected.as_dict())
        assert got["auc"]["auc_a"] == pytest.approx(roc_auc_score(labels, [s[3] for s in mine]))
        assert got["slides"] == len(mine)
        assert got["accuracy"]["a"] == pytest.approx(
            np.mean([int(s[3] >= 0.5) == s[2] for s in mine]))
        assert hospital in printed
    overall = result["overall"]["auc"]
    assert overall["weights"] == pytest.approx({"alpha": 0.6, "beta": 0.4})
    assert overall["delta"] == pytest.approx(
        0.6 * result["hospitals"]["alpha"]["auc"]["delta"]
        + 0.4 * result["hospitals"]["beta"]["auc"]["delta"])
    assert result["overall"]["stratified_auc_pairs"]["weighting"] == "pairs"
    assert result["overall"]["slides"] == 40
    assert "overall" in printed and "DeLong" in printed and str(out) in printed
    # Validation rows never enter; the same comparison without the file or the command.
    again = compare_runs(run_a, run_b, None, "proxy", n_bootstrap=300)
    assert again == result
    assert format_table(again).startswith(f"A: {run_a} (private)")


def test_two_models_of_one_run_and_the_model_must_be_named_when_ambiguous(tmp_path) -> None:
    slides = _cohort(1)
    run = _write_run(tmp_path / "run", _rows(slides, "private", 0) + _rows(slides, "proxy", 1))
    result = compare_runs(run, run, "private", "proxy", n_bootstrap=100)
    assert result["overall"]["auc"]["delta"] is not None
    with pytest.raises(CompareInputError, match="models private, proxy; say which"):
        read_predictions(run)
    with pytest.raises(CompareInputError, match="no test slides of model 'global'"):
        read_predictions(run, "global")


def test_a_perfect_small_hospital_is_marked_not_computable(tmp_path, capsys) -> None:
    # beta: 4 slides both models separate perfectly.
    slides = [s for s in _cohort(2) if s[0] == "alpha"] + [
        ("beta", "b0", 0, 0.1, 0.2), ("beta", "b1", 0, 0.2, 0.3),
        ("beta", "b2", 1, 0.8, 0.9), ("beta", "b3", 1, 0.9, 0.7)]
    run_a = _write_run(tmp_path / "a", _rows(slides, "proxy", 0))
    run_b = _write_run(tmp_path / "b", _rows(slides, "proxy", 1))
    assert main(["compare", str(run_a), str(run_b), "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    beta = next(line for line in printed.splitlines() if line.startswith("beta"))
    assert "not computable" in beta and "[1.000, 1.000]" not in printed
    assert "note: beta: DeLong variance 0 (both AUCs 1.0)" in printed


@pytest.mark.parametrize(("change", "mentions"), [
    (lambda s: s[:-1], "beta's test slides differ (0 only in A; 1 only in B, e.g. beta-15)"),
    (lambda s: [(h, i + "x" if i == "alpha-03" else i, *rest) for h, i, *rest in s],
     "alpha's test slides differ (1 only in A, e.g. alpha-03x; 1 only in B, e.g. alpha-03)"),
    (lambda s: [(h, i, 1 - y if i == "beta-02" else y, *rest) for h, i, y, *rest in s],
     "beta's test slides are labelled differently (1 slides, e.g. beta-02: 1 in A, 0 in B)"),
    (lambda s: [r for r in s if r[0] == "alpha"], "not the same hospitals (only in A: none; "
                                                 "only in B: beta)"),
])
def test_runs_on_different_slides_are_refused_in_one_line(tmp_path, capsys, change,
                                                          mentions) -> None:
    slides = _cohort(3)
    run_a = _write_run(tmp_path / "a", _rows(change(slides), "proxy", 0))
    run_b = _write_run(tmp_path / "b", _rows(slides, "proxy", 1))
    assert main(["compare", str(run_a), str(run_b)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and mentions in error
    assert str(run_a / "slide_predictions.csv") in error
    assert str(run_b / "slide_predictions.csv") in error
    assert "not a paired comparison" in error


def test_unevaluated_and_malformed_runs_are_one_line_naming_the_file(tmp_path, capsys) -> None:
    (tmp_path / "bare").mkdir()
    assert main(["compare", str(tmp_path / "bare"), str(tmp_path / "bare")]) == 1
    assert "run `slidefed evaluate" in capsys.readouterr().err
    run = _write_run(tmp_path / "bad", [("h", "s1", "test", "1", "high", "1", "proxy")])
    assert main(["compare", str(run), str(run)]) == 1
    assert f"{run / 'slide_predictions.csv'}:2: label, prediction or score" in \
        capsys.readouterr().err
    twice = _write_run(tmp_path / "twice", [("h", "s1", "test", 1, 0.3, 0, "proxy")] * 2)
    with pytest.raises(CompareInputError, match=r"slide_predictions.csv:3: slide s1 of h twice"):
        read_predictions(twice)
    headless = tmp_path / "headless"
    headless.mkdir()
    (headless / "slide_predictions.csv").write_text("hospital,slide_id\nh,s1\n")
    with pytest.raises(CompareInputError, match="header lacks column"):
        read_predictions(headless)

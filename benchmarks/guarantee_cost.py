"""``slidefed bench guarantee-cost``: what the proxy's formal guarantee costs, paired.

slidefed's default ProxyFL proxy learns from its own labels only (``dml.beta`` 0), which makes
its ε a theorem; the ProxyFL paper's proxy also distils from the private model (β > 0), which
was trained without DP, so its ε covers the DP-SGD steps only (``docs/privacy.md``). This
benchmark trains both variants on the same configuration and seeds — the same splits, hence
the same test slides — and compares them on those slides with ``slidefed compare``'s paired
statistics (DeLong for AUC, per hospital and slide-weighted over hospitals): Δ = guaranteed −
paper, for the private model and for the proxy, at every seed, and their mean over seeds.

With a slide configuration (``data.name: bags``, its ``data.root`` holding the hospitals'
bags: ``--set data.root=... --set data.hospitals=[...]`` as the workflow passes them) the
runs are trained and evaluated into ``-o``/``beta_<β>/seed_<s>/``. With an image benchmark
configuration (``configs/benchmarks/*.yaml``) they are ``slidefed bench algorithms`` runs of
ProxyFL into ``-o``/``beta_<β>/proxyfl/seed_<s>/``, and the comparison is the private model's
test accuracy, paired per client (each client's own test set) and averaged over clients.
Finished runs are reused, so a table can be rewritten without training again. Each
variant's DP noise is secret and fresh, so two seeds differ by their data draws and noise.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from scipy import stats

from federation import run_files
from federation.evaluation.compare import compare_runs
from formats.atomic import atomic_path

log = logging.getLogger(__name__)

VARIANTS = (("guaranteed", 0.0), ("paper", 0.5))


def run_variant(config: Path, out: Path, seed: int, beta: float, settings: list[str]) -> Path:
    """Train and evaluate one variant at one seed into ``out`` (kept if already evaluated)."""
    from federation.config import load_config
    from federation.evaluation.run import evaluate_run
    from federation.loop import run_federation

    if (out / run_files.SLIDE_METRICS).is_file():
        log.info("%s: evaluated already, reused", out)
        return out
    run_config = load_config(config, [*settings, f"seed={seed}", f"dml.beta={beta}",
                                      f"output_dir={out}", "backend=local"])
    run_federation(run_config, force=True)
    evaluate_run(out)
    return out


def measure_images(config: Path, seeds: list[int], output: Path, settings: list[str]
                   ) -> dict[str, Any]:
    """ProxyFL's private model with either proxy, on an image benchmark: per seed the mean over
    clients of (accuracy guaranteed − accuracy paper) on each client's own test set."""
    from benchmarks.algorithms import run_benchmark

    accuracy = {}
    for name, beta in VARIANTS:
        directory = output / f"beta_{beta}"
        run_benchmark(config, ["proxyfl"], seeds, directory,
                      overrides=[*settings, f"dml.beta={beta}"])
        accuracy[name] = {seed: json.loads((directory / "proxyfl" / f"seed_{seed}" /
                                            "summary.json").read_text())["final"]["private"]
                          ["accuracy"]["per_client"] for seed in seeds}
    rows = []
    for seed in seeds:
        a, b = accuracy["guaranteed"][seed], accuracy["paper"][seed]
        differences = [x - y for x, y in zip(a, b, strict=True)]
        rows.append({"seed": seed, "guaranteed": statistics.fmean(a),
                     "paper": statistics.fmean(b), "delta": statistics.fmean(differences),
                     "clients_better": sum(d > 0 for d in differences),
                     "clients": len(differences)})
    return {"config": str(config), "seeds": seeds, "settings": settings, "metric": "accuracy",
            "variants": dict(VARIANTS), "models": {"private": rows},
            "over_seeds": {"private": _over_seeds([r["delta"] for r in rows])}}


def measure(config: Path, seeds: list[int], output: Path, settings: list[str]) -> dict[str, Any]:
    """Both variants at every seed, compared pairwise per model; the result as a dict."""
    rows: dict[str, list[dict[str, Any]]] = {"private": [], "proxy": []}
    for seed in seeds:
        runs = {name: run_variant(config, output / f"beta_{beta}" / f"seed_{seed}", seed, beta,
                                  settings) for name, beta in VARIANTS}
        for model in rows:
            result = compare_runs(runs["guaranteed"], runs["paper"], model)
            overall = result["overall"]["auc"]
            rows[model].append({"seed": seed, "guaranteed": overall["auc_a"],
                                "paper": overall["auc_b"], "delta": overall["delta"],
                                "low": overall["low"], "high": overall["high"],
                                "p": overall["p"],
                                "hospitals": {h: r["auc"]["delta"]
                                              for h, r in result["hospitals"].items()}})
    return {"config": str(config), "seeds": seeds, "settings": settings, "metric": "auc",
            "variants": dict(VARIANTS), "models": rows,
            "over_seeds": {m: _over_seeds([r["delta"] for r in rs]) for m, rs in rows.items()}}


def _over_seeds(deltas: list[float]) -> dict[str, float | None]:
    """Mean and sd of the per-seed Δ and a one-sample t-test of mean 0 (None with one seed):
    the seeds are independent replicates (other splits, other noise)."""
    if len(deltas) < 2:
        return {"mean": deltas[0], "sd": None, "p": None}
    return {"mean": statistics.fmean(deltas), "sd": statistics.stdev(deltas),
            "p": float(stats.ttest_1samp(deltas, 0.0).pvalue)}


def table(result: dict[str, Any]) -> str:
    """The markdown table of ``measure``'s result."""
    images = result["metric"] == "accuracy"
    what = "accuracy, mean over clients" if images else "AUC"
    lines = [f"| model | seed | {what}: guaranteed (β 0) | paper (β 0.5) | Δ "
             + ("| clients better |" if images else "[95 % CI] | p |"), "|---|---|---|---|---|---|"]
    for model, rows in result["models"].items():
        for r in rows:
            cells = (f"{r['clients_better']} of {r['clients']}" if images else
                     f"[{r['low']:+.3f}, {r['high']:+.3f}] | {r['p']:.3f}")
            lines.append(f"| {model} | {r['seed']} | {r['guaranteed']:.3f} | "
                         f"{r['paper']:.3f} | {r['delta']:+.3f} "
                         + (f"| {cells} |" if images else f"{cells} |"))
        seeds = result["over_seeds"][model]
        spread = "" if seeds["sd"] is None else f" ± {seeds['sd']:.3f} (sd over seeds)"
        p = "" if seeds["p"] is None else f"{seeds['p']:.3f} (t over seeds)"
        lines.append(f"| {model} | mean | | | {seeds['mean']:+.3f}{spread} | {p} |")
    return "\n".join(lines)


def command(args: argparse.Namespace) -> int:
    """Run (or reuse) both variants, print the table, write ``table.md`` and ``result.json``."""
    from federation.config import load_config

    seeds = [int(s) for s in args.seeds.split(",")]
    slides = load_config(args.config, args.set).data.name == "bags"
    result = (measure if slides else measure_images)(args.config, seeds, args.output, args.set)
    text = table(result)
    for name, content in (("table.md", text + "\n"),
                          ("result.json", json.dumps(result, indent=2))):
        with atomic_path(args.output / name) as path:
            path.write_text(content)
    print(text)
    return 0

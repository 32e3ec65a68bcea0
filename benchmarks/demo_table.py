"""``slidefed bench demo-table OUT_DIR``: the table of ``docs/benchmarks/demo.md``, written from
what a finished workflow run (``make demo``: ``results/demo``) left on disk, so the page's
numbers are this command's output, never typed.

Per algorithm and model: the AUC of all hospitals' test slides pooled, with its bootstrap
95 % interval, the balanced accuracy, each hospital's AUC (``federation/<algorithm>/
slide_metrics.json``), and each hospital's final ε with what it is (``privacy.csv``); then
each job's wall time from Snakemake's ``benchmarks/*.tsv``. The pooled AUC ranks four models'
scores together; per-hospital and paired comparisons are ``slidefed compare``'s.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from federation import run_files
from federation.privacy.statement import epsilon_label


def _final_epsilons(run: Path) -> tuple[list[str], str]:
    final: dict[str, dict[str, str]] = {}
    for _, row in run_files.read_rows(run / run_files.PRIVACY, run_files.PRIVACY_COLUMNS):
        final[row["client"]] = row
    if not final:
        return [], ""
    rows = [final[c] for c in sorted(final, key=int)]
    return [f"{float(r['epsilon']):.1f}" for r in rows], (
        f"{epsilon_label(rows[0])}, δ = {float(rows[0]['delta']):g}")


def table(out_dir: Path) -> str:
    """The markdown table and job times of the workflow run in ``out_dir``."""
    runs = sorted(p.parent for p in (out_dir / "federation").glob("*/slide_metrics.json"))
    lines = ["| run | model | pooled test AUC | balanced accuracy | AUC per hospital | ε per "
             "hospital |", "|---|---|---|---|---|---|"]
    statements, hospitals = set(), set()
    for run in runs:
        metrics = json.loads((run / run_files.SLIDE_METRICS).read_text())
        epsilons, statement = _final_epsilons(run)
        for model, found in sorted(metrics.items()):
            pooled = found["pooled"]
            auc = pooled["auc"]
            hospitals.update(found["hospitals"])
            per_hospital = " / ".join(f"{h['auc']['value']:.2f}"
                                      for _, h in sorted(found["hospitals"].items()))
            dp = bool(epsilons) and model in ("proxy", "shared")
            lines.append(
                f"| {run.name} | {model} | {auc['value']:.3f} [{auc['low']:.3f}, "
                f"{auc['high']:.3f}] | {pooled['balanced_accuracy']['value']:.3f} | "
                f"{per_hospital} | {' / '.join(epsilons) if dp else '— (never leaves)'} |")
            if dp:
                statements.add(statement)
    notes = [f"Hospitals in order: {', '.join(sorted(hospitals))}. ε: "
             + ("; ".join(sorted(statements)) or "no DP model") + "."]
    times = []
    for tsv in sorted((out_dir / "benchmarks").glob("*.tsv")):
        with open(tsv, newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        if rows:
            times.append(f"{tsv.stem} {float(rows[-1]['s']):.0f} s")
    if times:
        notes.append("Job wall times (Snakemake): " + ", ".join(times) + ".")
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes)


def command(args: argparse.Namespace) -> int:
    """Print the table."""
    print(table(args.out_dir))
    return 0

"""``slidefed results-report``: the workflow's results as one HTML page (``report.render``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def run_results_report(args: argparse.Namespace) -> int:
    from report.render import write_results_report

    config = args.workflow_config
    text = None if config is None else sys.stdin.read() if config == "-" \
        else Path(config).read_text()
    written = write_results_report(args.output_dir, args.out, workflow_config=text,
                                   thumbnails=args.thumbnails, runs=args.runs or None)
    print(f"{args.output_dir}: report -> {written}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``results-report`` to the ``slidefed`` parser."""
    p = commands.add_parser(
        "results-report",
        help="one self-contained HTML page of a workflow's results: cohort, QC, training, "
             "privacy, ROC, metrics, cross-site, heatmaps (not `report`, which tables "
             "benchmark runs)")
    p.add_argument("output_dir", type=Path,
                   help="the workflow's output_dir (preprocessed/, federation/)")
    p.add_argument("-o", "--out", type=Path,
                   help="the HTML file to write (default OUTPUT_DIR/report.html)")
    p.add_argument("--workflow-config", metavar="FILE",
                   help="the workflow configuration (YAML) to show ('-': read it from stdin)")
    p.add_argument("--thumbnails", type=int, default=6, metavar="N",
                   help="QC pictures per hospital (default %(default)s)")
    p.add_argument("--run", dest="runs", action="append", default=[], metavar="NAME",
                   help="show the run federation/NAME (repeatable; default: every run there)")
    p.set_defaults(run=run_results_report)

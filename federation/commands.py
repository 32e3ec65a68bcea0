"""Federation subcommands: ``slidefed federate``, ``slidefed evaluate``, ``slidefed compare``,
``slidefed heatmap``, ``slidefed audit`` and ``slidefed results-report`` here; ``slidefed bench
algorithms`` and ``slidefed report`` (the benchmark's tables of runs) come from
``benchmarks.algorithms``.

torch and mpi4py are imported inside the command, so registering it costs ``slidefed tile``
nothing at start-up.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from federation.privacy.statement import epsilon_label


def run_federate(args: argparse.Namespace) -> int:
    from federation.config import load_config
    from federation.loop import resolve_backend, run_federation
    from federation.transport.comm import make_communicator, run_guarded

    config = load_config(args.config, args.set)
    if args.backend is not None:
        config = dataclasses.replace(config, backend=args.backend)

    def main() -> int:
        comm = make_communicator(resolve_backend(config.backend), config.clients)
        summary = run_federation(config, comm, resume=args.resume, force=args.force)
        if summary is not None:
            print(_one_line(summary, config.output_dir))
        return 0

    # Under MPI an error on one rank must end all of them instead of leaving them waiting.
    return run_guarded(main)


def run_evaluate(args: argparse.Namespace) -> int:
    from federation.evaluation.run import evaluate_run, one_line

    result = evaluate_run(args.run_dir, args.hospital or None, n_bootstrap=args.bootstrap)
    print(f"{args.run_dir}: {one_line(result)}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from federation.evaluation.compare import compare_runs, format_table

    result = compare_runs(args.run_a, args.run_b, args.model, args.model_b, output=args.output,
                          n_bootstrap=args.bootstrap, seed=args.seed)
    print(format_table(result))
    if args.output is not None:
        print(f"-> {args.output}")
    return 0


def run_heatmap(args: argparse.Namespace) -> int:
    from federation.evaluation.run_heatmaps import draw_run_heatmaps

    written = draw_run_heatmaps(args.run_dir, args.hospital or None, split=args.split,
                                limit=args.limit)
    print(f"{args.run_dir}: {len(written)} heatmaps -> "
          f"{args.run_dir / 'hospitals' / '<hospital>' / 'heatmaps'}")
    return 0


def run_audit(args: argparse.Namespace) -> int:
    from federation.audit.run import audit_run

    rows = audit_run(args.run_dir, args.hospital or None, output=args.output,
                     attack=args.attack, shadows=args.shadows)
    for row in rows:
        print(f"{row['hospital']} {row['model']} ({row['records']}): AUC {row['auc']:.3f}, "
              f"TPR at 1% FPR {row['tpr_at_fpr_0.01']:.3f}, epsilon_lb {row['epsilon_lb']:.2f} "
              f"of at most {row['epsilon_lb_max']:.2f} with these records "
              f"(accountant {row['epsilon']:.3g}: {row['guarantee']})")
    if not args.hospital:
        models = len({(row["hospital"], row["model"]) for row in rows})
        print(f"{models} models audited ({len(rows)} rows) -> "
              f"{args.output or args.run_dir}/audit.csv")
    return 0


def _one_line(summary: dict, output_dir: str) -> str:
    model = summary["reported_model"]
    accuracy = summary["final"].get(model, {}).get("accuracy")
    parts = [f"{summary['algorithm']}: {summary['rounds']} rounds, {summary['clients']} clients"]
    if accuracy is not None:
        parts.append(f"{model} accuracy {accuracy['mean']:.4f} ± {accuracy['std']:.4f}")
    if summary["epsilon"] is not None:
        privacy = summary["epsilon"]
        parts.append(f"max epsilon {privacy['max']:.3g} ({epsilon_label(privacy)})")
    parts.append(f"{summary['time']['wall_s']:.1f} s")
    return ", ".join(parts) + f" -> {output_dir}"


def register(commands: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the ``slidefed`` parser."""
    p = commands.add_parser(
        "federate",
        help="train a federation (its clients split over the ranks of mpiexec, or all in one "
             "process)",
    )
    p.add_argument("--config", type=Path, required=True, help="run configuration (YAML)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a dotted config key, e.g. --set dp.enabled=false "
                        "(repeatable; values follow YAML scalar rules)")
    p.add_argument("--backend", choices=("mpi", "local"), default=None,
                   help="mpi: the clients split over the MPI ranks (at most one rank per "
                        "client); local: all clients in this process "
                        "(default: the config's backend; auto picks mpi under mpiexec)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in output_dir from its last checkpoint")
    again.add_argument("--force", action="store_true",
                       help="start afresh even if output_dir holds a finished or checkpointed "
                            "run, deleting its checkpoints and summary")
    p.set_defaults(run=run_federate)

    p = commands.add_parser(
        "evaluate",
        help="slide-level diagnosis of a finished run on patch bags: per hospital and pooled")
    p.add_argument("run_dir", type=Path, help="the run's output directory")
    p.add_argument("--hospital", action="append", default=[],
                   help="evaluate only this hospital (repeatable; default: all, plus the "
                        "pooled and cross-site results)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples for the 95%% intervals (default %(default)s)")
    p.set_defaults(run=run_evaluate)

    p = commands.add_parser(
        "compare",
        help="two evaluated runs (or two models of one run) on the same test slides: per "
             "hospital and overall, AUC difference (DeLong) and accuracy, sensitivity, "
             "specificity differences (stratified paired bootstrap), each with a 95%% "
             "interval and p-value",
        description="Paired comparison of model A of RUN_A and model B of RUN_B on the same "
                    "test slides (both runs evaluated by `slidefed evaluate`). Per hospital: "
                    "each AUC, their difference with a DeLong 95% interval and two-sided "
                    "p-value, and the differences in accuracy, sensitivity and specificity at "
                    "each model's own thresholds with a bootstrap resampling slides within "
                    "hospital x label strata. Overall: the hospitals' AUCs and differences "
                    "combined as slide-weighted means (scores are never pooled across "
                    "hospitals). Refused unless both runs hold the same test slides with the "
                    "same labels in every hospital. Intervals that cannot be computed (one "
                    "class; DeLong variance 0, e.g. both AUCs 1.0) are marked so. Example: "
                    "slidefed compare results/demo/federation/proxyfl "
                    "results/demo/federation/fedavg --model private --model-b proxy "
                    "-o proxyfl_vs_fedavg.json")
    p.add_argument("run_a", type=Path, help="run A's output directory")
    p.add_argument("run_b", type=Path, help="run B's output directory (may be RUN_A, to "
                                            "compare two of its models)")
    p.add_argument("--model", default=None,
                   help="A's model, e.g. private or proxy (default: the run's reported model, "
                        "or its only one)")
    p.add_argument("--model-b", default=None,
                   help="B's model (default: --model if given, else B's reported model)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="also write the comparison as JSON here")
    p.add_argument("--bootstrap", type=int, default=2000,
                   help="paired bootstrap resamples (default %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="the bootstrap's seed (default %(default)s)")
    p.set_defaults(run=run_compare)

    p = commands.add_parser(
        "heatmap",
        help="heatmaps of a finished run's slides over their QC pictures, from the bags alone")
    p.add_argument("run_dir", type=Path, help="the run's output directory")
    p.add_argument("--hospital", action="append", default=[],
                   help="only this hospital (repeatable; default: all)")
    p.add_argument("--split", choices=("train", "validation", "test"), default="test",
                   help="whose slides (default %(default)s)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="at most the first N slides of the split per hospital")
    p.set_defaults(run=run_heatmap)

    p = commands.add_parser(
        "audit",
        help="membership-inference audit of a finished run's models: AUC, TPR at low FPR "
             "and an empirical lower bound on epsilon beside the accountant's")
    p.add_argument("run_dir", type=Path, help="the run's output directory")
    p.add_argument("--hospital", action="append", default=[],
                   help="audit only this hospital, writing only its own files (repeatable; "
                        "default: all, plus the run-level files)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="directory of the run-level audit.csv, audit.json and audit_roc.png "
                        "(default: RUN_DIR)")
    p.add_argument("--attack", choices=("loss", "lira"), default="loss",
                   help="loss: the loss-threshold attack (Yeom et al. 2018); lira: the "
                        "likelihood-ratio attack with shadow runs (Carlini et al. 2022), image "
                        "runs with audit.holdout only (default %(default)s)")
    p.add_argument("--shadows", type=int, default=8,
                   help="LiRA's shadow runs, trained on the local backend into "
                        "RUN_DIR/audit_shadows/ unless there (default %(default)s)")
    p.set_defaults(run=run_audit)

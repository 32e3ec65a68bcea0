"""Subcommands that compose the packages: ``slidefed predict`` (tiles with ``wsi/`` and
``preprocessing/``, scores with ``federation/``) and its benchmark, ``slidefed bench predict``.

The libraries are imported inside the command, so registering it costs the other commands
nothing at start-up.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from preprocessing.commands import positive_float, positive_int


def run_predict(args: argparse.Namespace) -> int:
    from federation.evaluation.scoring import SCORING_BATCH
    from slidefed.predict import predict_slides, table

    predictions, errors = predict_slides(
        args.model, args.inputs, args.output, device=args.device,
        batch_size=args.batch_size or SCORING_BATCH, workers=args.workers, readers=args.readers,
        fill_mpp=args.fill_mpp, annotations=args.annotation, heatmaps=not args.no_heatmap,
        geojson=args.geojson)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if predictions:
        print(table(predictions))
        print(f"{len(predictions)} of {len(args.inputs)} slides scored -> "
              f"{args.output / 'predictions.csv'}")
    return 0 if predictions else 1


def register(commands: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the ``slidefed`` parser."""
    p = commands.add_parser(
        "predict", help="diagnose new slides (or bags) with a saved model: scores, heatmaps, "
                        "GeoJSON")
    p.add_argument("--model", type=Path, required=True,
                   help="model file (hospitals/<h>/models/<model>.pt of a run)")
    p.add_argument("inputs", type=Path, nargs="+", metavar="SLIDE_OR_BAG",
                   help="slide files (tiled on the fly at the model's settings) or .h5 bags")
    p.add_argument("-o", "--output", type=Path, default=Path("predictions"),
                   help="output directory (default %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the model runs (default %(default)s: a GPU when there is one)")
    p.add_argument("--batch-size", type=positive_int,
                   help="patches per forward pass (default: as slidefed evaluate)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="processes that read and encode a slide's patches when tiling it "
                        "(default %(default)s)")
    p.add_argument("--readers", type=positive_int,
                   help="threads that read and decode the next batches while the model runs "
                        "(default: one per core, at most 4)")
    p.add_argument("--fill-mpp", type=positive_float, metavar="X",
                   help="level-0 µm per pixel of slides whose files state none")
    p.add_argument("--annotation", type=Path, metavar="PATH",
                   help="GeoJSON tumour annotation outlined on the heatmap (one slide), or a "
                        "directory of <slide_id>.geojson")
    p.add_argument("--geojson", action="store_true",
                   help="also export patches at or above the threshold as QuPath GeoJSON "
                        "(OUTDIR/regions/<slide>.geojson)")
    p.add_argument("--no-heatmap", action="store_true", help="skip the heatmap PNGs")
    p.set_defaults(run=run_predict)

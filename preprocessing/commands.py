"""Preprocessing subcommands: tile, preprocess, demo-cohort, validate, bench tiling."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from wsi.annotations import DEFAULT_TUMOUR_CLASSES, AnnotationRules
from wsi.bag import CODECS, PatchEncoding

from .options import TilingOptions

# The libraries behind each command (OpenSlide, scikit-image, SciPy) are imported inside it:
# every MPI rank of `slidefed federate` parses this module's arguments too.

log = logging.getLogger(__name__)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def add_tiling_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that tiles slides."""
    defaults = TilingOptions()
    parser.add_argument("--mpp", type=positive_float, default=defaults.target_mpp,
                        help="target resolution in µm per pixel (default %(default)s, about 20x)")
    parser.add_argument("--patch-size", type=positive_int, default=defaults.patch_size,
                        help="patch side in pixels at the target resolution (default %(default)s)")
    parser.add_argument("--min-tissue", type=fraction, default=defaults.min_tissue,
                        help="keep patches with at least this tissue fraction "
                             "(default %(default)s)")
    mpp = parser.add_mutually_exclusive_group()
    mpp.add_argument("--fill-mpp", type=positive_float, metavar="X",
                     help="level-0 µm per pixel of slides whose files state none (files that "
                          "state one keep theirs)")
    mpp.add_argument("--override-mpp", type=positive_float, metavar="X",
                     help="level-0 µm per pixel replacing what every slide's file states "
                          "(recorded as an override)")
    parser.add_argument("--encoding", choices=sorted(CODECS), default=defaults.encoding.name,
                        help="how patches are stored: jpeg (default, lossy, ~9x smaller) or "
                             "deflate (lossless)")
    parser.add_argument("--encoding-level", type=int, default=None,
                        help="JPEG quality 1-95 (default 90) or deflate level 0-9 (default 1)")
    parser.add_argument("--tumour-threshold", type=fraction, default=defaults.tumour_threshold,
                        help="a patch is tumour when this fraction of it is annotated tumour "
                             "(default %(default)s; the fraction itself is stored)")
    parser.add_argument("--tumour-class", action="append", dest="tumour_classes",
                        metavar="NAME",
                        help="QuPath classification counted as tumour, case-insensitive; "
                             f"repeat for several (default {', '.join(DEFAULT_TUMOUR_CLASSES)})")
    parser.add_argument("--allow-fluorescence", action="store_true",
                        help="tile fluorescence (dark-field) slides instead of refusing them; "
                             "the tissue mask is made for brightfield stains")
    parser.add_argument("--ignore-unclassified", action="store_true",
                        help="annotations without a classification are not tumour (default: "
                             "they are)")


def tiling_options(args: argparse.Namespace) -> TilingOptions:
    return TilingOptions(target_mpp=args.mpp, patch_size=args.patch_size,
                         min_tissue=args.min_tissue, fill_mpp=args.fill_mpp,
                         override_mpp=args.override_mpp,
                         encoding=PatchEncoding(args.encoding, args.encoding_level),
                         tumour_threshold=args.tumour_threshold,
                         annotation_rules=AnnotationRules(
                             tuple(args.tumour_classes or DEFAULT_TUMOUR_CLASSES),
                             unclassified_is_tumour=not args.ignore_unclassified),
                         allow_fluorescence=args.allow_fluorescence)


def run_tile(args: argparse.Namespace) -> int:
    from .tile import tile_slide

    result = tile_slide(args.slide, args.output, tiling_options(args), workers=args.workers,
                        qc_path=args.qc, annotation=args.annotation, slide_label=args.label)
    log.info("%s: %d patches in %.1f s -> %s", result.slide_id, result.n_patches,
             result.seconds, result.bag_path)
    return 0


def run_preprocess(args: argparse.Namespace) -> int:
    from .hospital import preprocess_hospital

    rows = preprocess_hospital(args.hospital, args.slides, args.output, tiling_options(args),
                               workers=args.workers, annotations=args.annotations,
                               force=args.force)
    failed = [r for r in rows if r.status != "ok"]
    print(f"{args.hospital}: {len(rows) - len(failed)} of {len(rows)} slides ok, "
          f"{sum(r.n_patches for r in rows)} patches; {len(failed)} failed")
    for row in failed:
        print(f"  failed {row.slide_id}: {row.error}")
    return 1 if len(failed) == len(rows) else 0


def run_demo_cohort(args: argparse.Namespace) -> int:
    from .demo_cohort import make_demo_cohort

    kwargs = {k: v for k, v in (("hospitals", args.hospitals),
                                ("slides_per_hospital", args.slides_per_hospital),
                                ("size_um", args.size_um),
                                ("tumour_contrast", args.tumour_contrast)) if v is not None}
    for hospital in make_demo_cohort(args.output, seed=args.seed, workers=args.workers,
                                     **kwargs):
        print(hospital)
    return 0


def run_synthetic_slide(args: argparse.Namespace) -> int:
    from wsi.synthetic import SyntheticSlideSpec, hospital_stain_profile, write_synthetic_slide

    spec = SyntheticSlideSpec(width=args.width, height=args.height or args.width,
                              mpp=args.slide_mpp, tumour_regions=args.tumour_regions,
                              stain=hospital_stain_profile(args.stain), seed=args.seed)
    print(write_synthetic_slide(args.output, spec).path)
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from wsi.bag import BagError, check_bag

    bad = 0
    for bag in args.bags:
        try:
            n = check_bag(bag, deep=args.deep)
            print(f"ok {bag}: {n} patches")
        except BagError as exc:
            print(f"error: {exc}")
            bad += 1
    return 1 if bad else 0


def register(commands: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the ``slidefed`` parser."""
    p = commands.add_parser("tile", help="cut one slide into a patch bag")
    p.add_argument("slide", type=Path, help="slide file (any format OpenSlide reads)")
    p.add_argument("-o", "--output", type=Path, required=True, help="bag to write (.h5)")
    p.add_argument("--workers", type=positive_int, default=1, help="processes (default 1)")
    p.add_argument("--qc", type=Path, help="also write a QC picture (PNG) here")
    p.add_argument("--annotation", type=Path,
                   help="GeoJSON tumour annotation (level-0 px): patch labels are tumour "
                        "fractions")
    p.add_argument("--label", type=int, choices=(0, 1),
                   help="slide label, copied to every patch when there is no --annotation")
    add_tiling_arguments(p)
    p.set_defaults(run=run_tile)

    p = commands.add_parser("preprocess", help="one hospital's slides to bags + manifest + QC")
    p.add_argument("--hospital", required=True, help="hospital name, for logs and summaries")
    p.add_argument("--slides", type=Path, required=True,
                   help="directory of slides, or CSV with slide_id,path,label[,annotation]")
    p.add_argument("--annotations", type=Path,
                   help="directory of tumour annotations, DIR/<slide_id>.geojson, for slides "
                        "the CSV gives none")
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="slides tiled at once (default 1)")
    p.add_argument("--force", action="store_true", help="re-tile slides that already have a bag")
    add_tiling_arguments(p)
    p.set_defaults(run=run_preprocess)

    p = commands.add_parser(
        "demo-cohort", help="write a synthetic multi-hospital cohort",
        description="Synthetic H&E slides, labels.csv and tumour annotations per hospital. "
        "Hospitals differ in stain, scanner (hospital b at 20x, 0.5 µm/px; the others at 40x, "
        "0.25 µm/px), tumour prevalence and size (default 120, 150, 40, 110 slides; hospital c "
        "is small); some tumour slides hold only small foci, and inflamed regions mimic "
        "tumour. Every slide has a 1.0 µm/px level.")
    p.add_argument("-o", "--output", type=Path, required=True, help="cohort directory")
    p.add_argument("--hospitals", type=positive_int, help="number of hospitals (default 4)")
    p.add_argument("--slides-per-hospital", type=positive_int, nargs="+", metavar="N",
                   help="slides per hospital: one number for all, or one per hospital "
                   "(default: each hospital's own)")
    p.add_argument("--size-um", type=positive_int,
                   help="slide width in µm, a multiple of 16 (default 320)")
    p.add_argument("--tumour-contrast", type=float,
                   help="difficulty, 0 (tumour looks normal) to 1 (obvious); default 0.25")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="slides written at once (default 1)")
    p.set_defaults(run=run_demo_cohort)

    p = commands.add_parser("synthetic-slide",
                            help="write one synthetic H&E slide (pyramidal JPEG TIFF)")
    p.add_argument("-o", "--output", type=Path, required=True, help="slide to write (.tiff)")
    p.add_argument("--width", type=positive_int, required=True, help="level-0 width in px")
    p.add_argument("--height", type=positive_int, help="level-0 height in px (default: width)")
    p.add_argument("--slide-mpp", type=positive_float, default=0.25,
                   help="level-0 µm per pixel (default %(default)s)")
    p.add_argument("--tumour-regions", type=int, default=2, help="tumour regions (default 2)")
    p.add_argument("--stain", type=int, default=0, help="hospital stain profile index")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(run=run_synthetic_slide)

    p = commands.add_parser("validate", help="check patch bags against the format")
    p.add_argument("bags", type=Path, nargs="+", help="bag files")
    p.add_argument("--deep", action="store_true",
                   help="verify the checksum of every patch and decode it")
    p.set_defaults(run=run_validate)

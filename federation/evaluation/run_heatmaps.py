"""``slidefed heatmap RUN_DIR``: heatmaps of a finished run's slides, from bags and QC pictures.

For each hospital of the run (or those asked for) and each of its saved models, every slide
of one split (``test`` by default) is scored as ``slidefed evaluate`` scores it, and its patch
tumour probabilities are drawn (``federation.evaluation.heatmap``) over the QC picture that
preprocessing wrote for it, ``<data.root>/<h>/qc/<slide_id>.png``, to
``hospitals/<h>/heatmaps/<model>/<slide_id>.png``; when every hospital is drawn, the run's
``heatmaps.csv`` lists them (``federation.run_files.HEATMAP_COLUMNS``), so a reader (the
results report, a Snakemake rule) finds this run's heatmaps and not the leftovers of an
earlier one with another ``--limit``. Everything comes from the bag and that picture, so no
slide file is opened. The QC picture covers the whole slide, like the
thumbnail ``slidefed predict`` reads, and keeps preprocessing's marks: the tissue outline
(green), pen marks (orange) and each kept patch's square (blue, faint under the
probabilities).

The bags keep the annotation's tumour-area fraction per patch, not its polygons, so on an
annotated slide the outline drawn is that of the patches the annotation makes tumour
patches (fraction at least the bag's threshold, the patches training took as tumour),
merged into regions (``federation.evaluation.regions.merged_patches``).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from federation.data.bags import BagIndex, BagReader
from federation.evaluation.heatmap import heatmap_title, read_patch_map, write_heatmap
from federation.evaluation.regions import merged_patches
from federation.evaluation.run import SPLITS, SavedModel, hospital_slides, open_run, saved_models
from federation.evaluation.scoring import scoring_threads
from federation.run_files import HEATMAP_COLUMNS, HEATMAPS
from formats.atomic import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Heatmap:
    """One heatmap drawn: a row of ``heatmaps.csv``."""

    hospital: str
    model: str
    slide_id: str
    split: str
    label: int | None
    score: float
    prediction: int
    path: Path  # the PNG


def draw_run_heatmaps(run_dir: str | Path, hospitals: Sequence[str] | None = None, *,
                      split: str = "test", limit: int | None = None,
                      progress: bool = True) -> list[Heatmap]:
    """Draw the heatmaps of ``hospitals`` (default: all, and then ``heatmaps.csv`` too) of
    the run in ``run_dir``: every slide of ``split`` (at most the first ``limit`` in
    ``splits.csv`` order) with every saved model of its hospital. Returns what was drawn."""
    if split not in SPLITS:
        raise ValueError(f"heatmap: split {split!r} is not one of {list(SPLITS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"heatmap: --limit must be at least 1, got {limit}")
    run_dir = Path(run_dir)
    config, run, chosen = open_run(run_dir, hospitals)
    work = [(h, saved_models(run, h), hospital_slides(config, run, h)[split][:limit])
            for h in chosen]
    reader = BagReader(threads=scoring_threads())
    written = []
    with tqdm(total=sum(len(m) * len(s) for _, m, s in work), desc="heatmap", unit="slide",
              disable=None if progress else True) as bar:
        for hospital, models, slides in work:
            qc_dir = Path(config.data.root) / hospital / "qc"
            for bag in slides:
                thumbnail = _qc_picture(qc_dir / f"{bag.slide_id}.png")
                for model in models:
                    path = run.hospital_dir(hospital) / "heatmaps" / model.name \
                        / f"{bag.slide_id}.png"
                    written.append(_draw(path, model, reader, bag, thumbnail, split))
                    bar.update()
    reader.close()
    if hospitals is None:
        _write_index(run_dir, written)
    return written


def _draw(path: Path, model: SavedModel, reader: BagReader, bag: BagIndex,
          thumbnail: np.ndarray | None, split: str) -> Heatmap:
    score, probabilities = model.aggregator.score_with_probabilities(model.module, reader, bag)
    patches = read_patch_map(bag.path)
    tumour = merged_patches(patches, bag.patch_labels == 1) \
        if bag.label_source == "annotation" else []
    prediction = int(score >= model.threshold)
    title = heatmap_title(bag.slide_id, score, prediction, model.threshold,
                          f"{model.hospital} {model.name}")
    write_heatmap(path, patches, probabilities, thumbnail, title, tumour)
    return Heatmap(model.hospital, model.name, bag.slide_id, split, bag.label, score,
                   prediction, path)


def _write_index(run_dir: Path, heatmaps: Sequence[Heatmap]) -> None:
    with atomic_path(run_dir / HEATMAPS) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEATMAP_COLUMNS)
        for h in heatmaps:
            writer.writerow((h.hospital, h.model, h.slide_id, h.split,
                             "" if h.label is None else h.label, repr(h.score), h.prediction,
                             h.path.relative_to(run_dir).as_posix()))


def _qc_picture(path: Path) -> np.ndarray | None:
    """Preprocessing's QC picture of a slide as RGB, or None (a blank background) without it."""
    if not path.is_file():
        log.warning("%s: QC picture not found; heatmap drawn without the slide", path)
        return None
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as error:
        raise ValueError(f"{path}: unreadable QC picture ({error})") from None

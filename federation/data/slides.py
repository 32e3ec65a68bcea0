"""Patch bags as client data: one hospital = one client, slides split by slide, slide-level DP.

A hospital's client reads only that hospital's preprocessing output, ``data.root/<hospital>``
(``manifest.csv`` and ``bags/<slide_id>.h5``), splits its slides into train / validation /
test (``federation.data.splits``) and trains on patches streamed from the bags.

**Batches.** A step takes slides, and from each slide at most ``slides.patches_per_slide``
patches (slide-balanced: a large slide counts as much as a small one). Within a slide whose
patches carry both labels, half the patches are drawn from tumour patches and half from the
others, so the rare tumour patches of a slide with a small focus are seen. Models trained
without DP draw each step's slides with weights 1/(count of their label), so both classes
are equally represented (class-balanced sampling).

**Privacy unit.** With ``slides.privacy_unit: slide`` (default) one privacy unit is a slide:
DP-SGD Poisson-samples slides (q = expected slides per step / training slides), and each
batch carries ``groups`` so that each slide's summed gradient is clipped as one record
(``federation.privacy``); the reported ε protects a whole slide. With ``patch`` one unit is
a patch: Poisson sampling over all training patches, per-patch clipping, and an ε that
protects one patch only.

**Reading.** Patches are decoded lazily (``BagReader``), in ``slides.workers`` DataLoader
processes when asked; each step's choice of slides, patches and stain jitter is made in the
training process from the model's generator, so results do not depend on the worker count.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from federation.config import FederationConfig, SlidesConfig
from federation.data.bags import BagFormatError, BagIndex, BagReader, index_bag
from federation.data.base import Batch, ClientData
from federation.data.patches import PATCH_MEAN, PATCH_STD, to_model_input
from federation.data.splits import split_slides, write_splits
from federation.evaluation.aggregation import calibrate
from federation.evaluation.metrics import point_metrics
from federation.evaluation.scoring import evenly_spaced, patch_probabilities, top_k_score
from federation.seeds import derive_seed
from formats.hospital_dir import OK, ManifestError, bag_path, manifest_path, read_manifest_rows

log = logging.getLogger(__name__)


class CohortError(ValueError):
    """A hospital's preprocessing output that cannot be trained on; one line naming the file."""


@dataclass(frozen=True)
class PatchRequest:
    """Patches ``indices`` of training slide ``slide`` for one step, belonging to unit
    ``group`` of that step, stain-jittered from ``seed``."""

    slide: int
    indices: tuple[int, ...]
    group: int
    seed: int


class _StepRows(Dataset):
    """Reads the rows of ``PatchRequest``s; what DataLoader workers run."""

    def __init__(self, slides: Sequence[BagIndex], hed_sigma: float) -> None:
        self.slides, self.hed_sigma = slides, hed_sigma
        self.reader = BagReader()

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, request: PatchRequest) -> tuple[torch.Tensor, torch.Tensor, int]:
        bag = self.slides[request.slide]
        patches = self.reader.read(bag.path, np.asarray(request.indices, np.int64))
        generator = torch.Generator().manual_seed(request.seed)
        x = to_model_input(patches, hed_sigma=self.hed_sigma, generator=generator)
        y = torch.from_numpy(bag.patch_labels[list(request.indices)])
        return x, y, request.group


def _collate(rows: list[tuple[torch.Tensor, torch.Tensor, int]], *, size: int,
             grouped: bool) -> Batch:
    if not rows:  # an empty Poisson batch: still a DP step (pure noise)
        empty = torch.zeros(0, dtype=torch.int64)
        return Batch(torch.zeros((0, 3, size, size)), empty, empty if grouped else None)
    x = torch.cat([r[0] for r in rows])
    y = torch.cat([r[1] for r in rows])
    groups = (torch.cat([torch.full((len(r[1]),), r[2], dtype=torch.int64) for r in rows])
              if grouped else None)
    return Batch(x, y, groups)


class SlideClientData(ClientData):
    """One hospital's slides: training batches from its bags, validation by slide score."""

    eval_split = "validation"
    num_classes = 2

    def __init__(self, hospital: str, splits: dict[str, list[BagIndex]],
                 settings: SlidesConfig, *, seed: int = 0) -> None:
        self.name = hospital
        self.settings = settings
        self.seed = seed  # of the slide head's fit (attention_mil)
        self.unit = settings.privacy_unit
        self.train, self.validation, self.test = (splits[s] for s in
                                                  ("train", "validation", "test"))
        if not self.train:
            raise CohortError(f"{hospital}: no slide left to train on")
        self._rows = _StepRows(self.train, settings.hed_sigma if settings.augment == "hed"
                               else 0.0)
        self._reader = BagReader()
        sizes = np.array([bag.n_patches for bag in self.train])
        self._patch_starts = np.concatenate([[0], np.cumsum(sizes)])
        labels = np.array([bag.label for bag in self.train])
        counts = np.bincount(labels, minlength=2)
        if settings.aggregation == "attention_mil" and np.count_nonzero(counts) < 2:
            # Checked before training: the head is fitted after it, on these slides.
            raise CohortError(f"{hospital}: slides.aggregation attention_mil needs training "
                              "slides of both labels; this hospital's are all "
                              f"{int(labels[0])}")
        self._balance = torch.tensor([1.0 / counts[label] for label in labels],
                                     dtype=torch.float64)

    # ------------------------------------------------------------------ what models need

    @property
    def num_units(self) -> int:
        return len(self.train) if self.unit == "slide" else int(self._patch_starts[-1])

    def model_options(self) -> dict[str, Any]:
        return {"in_channels": 3, "image_size": self.settings.patch_size}

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {"kind": "slides", "target_mpp": s.target_mpp, "patch_size": s.patch_size,
                "encoding": "as stored in the bags",
                "normalisation": {"mean": list(PATCH_MEAN), "std": list(PATCH_STD)},
                "aggregation": {"method": s.aggregation, "k": s.top_k},
                "privacy_unit": self.unit}

    # ------------------------------------------------------------------ batches

    def epoch(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        if self.unit == "patch":
            order = torch.randperm(self.num_units, generator=generator).tolist()
            return self._load(self._patch_steps(order[i:i + batch_size] for i in
                                                range(0, len(order), batch_size)), generator)
        steps = math.ceil(len(self.train) / batch_size)
        chosen = [torch.multinomial(self._balance, min(batch_size, len(self.train)),
                                    replacement=False, generator=generator).tolist()
                  for _ in range(steps)]
        return self._load(self._slide_steps(chosen, generator), generator)

    def sampled(self, unit_batches: Iterable[list[int]], generator: torch.Generator
                ) -> Iterator[Batch]:
        if self.unit == "patch":
            return self._load(self._patch_steps(unit_batches), generator)
        return self._load(self._slide_steps(unit_batches, generator), generator)

    def _slide_steps(self, slide_batches: Iterable[list[int]], generator: torch.Generator
                     ) -> Iterator[list[tuple[int, tuple[int, ...], int]]]:
        for slides in slide_batches:
            yield [(s, self._choose_patches(s, generator), group)
                   for group, s in enumerate(slides)]

    def _patch_steps(self, patch_batches: Iterable[list[int]]
                     ) -> Iterator[list[tuple[int, tuple[int, ...], int]]]:
        for flat in patch_batches:
            slides = np.searchsorted(self._patch_starts, flat, side="right") - 1
            yield [(int(s), (int(p - self._patch_starts[s]),), 0)
                   for s, p in zip(slides, flat, strict=True)]

    def _choose_patches(self, slide: int, generator: torch.Generator) -> tuple[int, ...]:
        """At most ``patches_per_slide`` patches, half tumour and half not when both occur."""
        labels = self.train[slide].patch_labels
        k = self.settings.patches_per_slide
        tumour, other = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
        if len(tumour) and len(other):
            # The odd patch goes to the rare tumour patches: with k // 2, a tumour slide at
            # patches_per_slide = 1 would only ever show normal patches.
            n_tumour = min(len(tumour), max(k - k // 2, k - len(other)))
            picks = [_draw(tumour, n_tumour, generator), _draw(other, k - n_tumour, generator)]
            return tuple(sorted(int(i) for part in picks for i in part))
        return tuple(sorted(int(i) for i in _draw(np.arange(len(labels)), k, generator)))

    def _load(self, steps: Iterator[list[tuple[int, tuple[int, ...], int]]],
              generator: torch.Generator) -> Iterator[Batch]:
        """The steps' patches as batches."""
        requests = [[PatchRequest(s, indices, group, int(torch.randint(2**62, (1,),
                                                                        generator=generator)))
                     for s, indices, group in step] for step in steps]
        grouped = self.unit == "slide"

        def collate(rows: list) -> Batch:
            return _collate(rows, size=self.settings.patch_size, grouped=grouped)

        if self.settings.workers == 0:
            loaded: Iterable[Batch] = (collate([self._rows[r] for r in step])
                                       for step in requests)
        else:
            loaded = DataLoader(self._rows, batch_sampler=requests, collate_fn=collate,
                                num_workers=self.settings.workers,
                                multiprocessing_context="fork")
        yield from loaded

    def unit_inputs(self) -> Iterator[torch.Tensor]:
        """Each training slide's patches (evenly spaced, at most ``eval_patches_per_slide``),
        or with ``privacy_unit: patch`` each patch alone, as unaugmented model input."""
        limit = None if self.unit == "patch" else self.settings.eval_patches_per_slide
        for bag in self.train:
            x = to_model_input(self._reader.read(bag.path, evenly_spaced(bag.n_patches, limit)))
            yield from (x.split(1) if self.unit == "patch" else (x,))

    # ------------------------------------------------------------------ evaluation

    def _scored(self, module: nn.Module, slides: Sequence[BagIndex], limit: int | None
                ) -> Iterator[tuple[BagIndex, np.ndarray, np.ndarray]]:
        """(bag, patch indices, their tumour probabilities) of each slide: ``limit`` evenly
        spaced patches, or all of them."""
        for bag in slides:
            indices = evenly_spaced(bag.n_patches, limit)
            yield bag, indices, patch_probabilities(module, self._reader, bag, indices)

    def evaluate(self, module: nn.Module) -> dict[str, float]:
        """Slide AUC and accuracy (threshold 0.5) on the validation slides, and the mean
        patch cross-entropy of the patches scored."""
        if not self.validation:
            return {}
        scores, losses, count = [], 0.0, 0
        for bag, indices, p in self._scored(module, self.validation,
                                            self.settings.eval_patches_per_slide):
            scores.append(top_k_score(p, self.settings.top_k))
            y = bag.patch_labels[indices]
            probabilities = torch.from_numpy(np.stack([1 - p, p], axis=1)).clamp(min=1e-12)
            losses += float(F.nll_loss(probabilities.log(), torch.from_numpy(y),
                                       reduction="sum"))
            count += len(y)
        labels = [bag.label for bag in self.validation]
        metrics = point_metrics(labels, scores, 0.5)
        return {"auc": metrics["auc"], "accuracy": metrics["accuracy"],
                "loss": losses / max(count, 1)}

    def calibrate(self, module: nn.Module) -> dict[str, Any]:
        """The slide aggregation (``slides.aggregation``, fitted on the training slides where
        it needs fitting) and the decision threshold on its score, chosen on the validation
        slides."""
        aggregator, threshold = calibrate(self.settings, module, self._reader, self.train,
                                          self.validation, seed=self.seed, what=self.name)
        return {"threshold": threshold, "aggregation": aggregator.card()}

    def write_records(self, directory: Path) -> None:
        """This hospital's ``splits.csv``."""
        splits = {bag.slide_id: split for split, bags in
                  (("train", self.train), ("validation", self.validation), ("test", self.test))
                  for bag in bags}
        write_splits(directory / "splits.csv", self.name, splits)


def _draw(pool: np.ndarray, k: int, generator: torch.Generator) -> np.ndarray:
    """``min(k, len(pool))`` distinct elements of ``pool``."""
    order = torch.randperm(len(pool), generator=generator)[:k].numpy()
    return pool[order]


# ---------------------------------------------------------------------------- loading


def read_manifest(hospital_dir: Path) -> list[tuple[str, int, Path]]:
    """(slide_id, label, bag path) of every ``ok`` slide in ``hospital_dir/manifest.csv``."""
    path = manifest_path(hospital_dir)
    if not path.is_file():
        raise CohortError(f"{path}: no manifest; run `slidefed preprocess` for this hospital")
    slides, failed = [], 0
    try:
        for line, row in read_manifest_rows(path, ("slide_id", "label", "status")):
            if row["status"] != OK:
                failed += 1
                continue
            label = (row["label"] or "").strip()
            if label not in ("0", "1"):
                raise CohortError(f"{path}: line {line}: label {label!r} of slide "
                                  f"{row['slide_id']!r} is not 0 or 1")
            slides.append((row["slide_id"], int(label), bag_path(hospital_dir, row["slide_id"])))
    except ManifestError as error:
        raise CohortError(str(error)) from None
    if failed:
        log.warning("%s: %d slides failed preprocessing and are left out", path, failed)
    if not slides:
        raise CohortError(f"{path}: no slide was preprocessed successfully")
    return slides


def load_hospital(config: FederationConfig, hospital: str) -> SlideClientData:
    """Index one hospital's bags, check them against ``config.slides`` and split them."""
    settings = config.slides
    directory = Path(config.data.root) / hospital
    bags = []
    for slide_id, label, path in read_manifest(directory):
        if not path.is_file():
            raise CohortError(f"{manifest_path(directory)}: slide {slide_id!r} is listed as "
                              f"ok but its bag {path} is missing")
        bag = index_bag(path, label)
        if bag.patch_size != settings.patch_size:
            raise BagFormatError(path, f"patch size {bag.patch_size} differs from "
                                       f"slides.patch_size = {settings.patch_size}")
        if not math.isclose(bag.target_mpp, settings.target_mpp, rel_tol=1e-6):
            raise BagFormatError(path, f"tiled at {bag.target_mpp} µm/px, not at "
                                       f"slides.target_mpp = {settings.target_mpp}")
        bags.append(bag)
    splits = split_slides([b.slide_id for b in bags], [b.label for b in bags],
                          validation_fraction=settings.validation_fraction,
                          test_fraction=settings.test_fraction,
                          seed=derive_seed(config.seed, "split", hospital), hospital=hospital)
    by_split: dict[str, list[BagIndex]] = {"train": [], "validation": [], "test": []}
    for bag in bags:
        by_split[splits[bag.slide_id]].append(bag)
    sources = sorted({b.label_source for b in bags})
    log.info("%s: %d slides (%d train, %d validation, %d test), %d patches, patch labels "
             "from %s", hospital, len(bags), *(len(by_split[s]) for s in by_split),
             sum(b.n_patches for b in bags), " and ".join(sources))
    return SlideClientData(hospital, by_split, settings,
                           seed=derive_seed(config.seed, "aggregation", hospital))


def load_slide_clients(config: FederationConfig, clients: Iterable[int]
                       ) -> dict[int, SlideClientData]:
    """The hospitals of ``clients`` (client k = ``data.hospitals[k]``)."""
    return {c: load_hospital(config, config.client_name(c)) for c in clients}

"""``slidefed audit RUN_DIR``: membership inference on every saved model of a finished run.

For each hospital this attacks each of its saved models (``hospitals/<h>/models/*.pt``):
those that left it during training (``shared`` in the model file: the proxy, FedAvg's,
AvgPush's or CWT's model, FML's meme), a released model (``regular_dp``), and, for scale,
the private model, which never leaves. The attack is the loss-threshold attack (Yeom,
Giacomelli, Fredrikson & Jha, "Privacy risk in machine learning: analyzing the connection to
overfitting", IEEE CSF 2018): a record is called a member when the model's loss on it is
low; its score is minus the loss. With ``attack="lira"`` the scores are LiRA's, from shadow
runs (``federation.audit.lira``).
``federation.audit.metrics`` turns the scores into AUC,
TPR at low FPR and ε_lb, reported beside the accountant's ε of the model file (∞ for a model
trained without DP) and beside ``epsilon_lb_max``, the largest ε_lb this audit could have
produced with the records it counted (a perfect attack: every member flagged, no
non-member). That is the audit's power: ε_lb is counted on half the records, and with 10,
25, 50 or 100 per side there (δ = 1e-5) it is at most 0.81, 1.84, 2.57 or 3.28, so an
accountant ε of 13 can be neither confirmed nor contradicted here, and an ε_lb of 0 on such
a model proves nothing. ``federation.audit.canaries`` audits DP-SGD
itself with the power this loss attack lacks.

Members and non-members, per hospital, on that hospital's own data (nothing leaves it):

- images: ``hospitals/<h>/audit_records.csv``, written at training time when the run holds
  images out (``audit.holdout``): members are the client's training images, non-members
  images of the training split with the same label distribution that no client trained
  on (rows with ``records = holdout``). The test split is not used: it is a different
  sample (MNIST's test digits come from other writers), and a shift between members and
  non-members would pass for leakage. With ``audit.canaries``, mislabelled images half of
  which the client trained on are audited too (``records = canary``).
- slides (``records = test``): ``hospitals/<h>/splits.csv``: members are the training
  slides, non-members the test slides, which the run never trains on nor calibrates with
  (the validation slides choose thresholds and so are left out). One record is one slide,
  the unit slide-level DP protects; its loss is the mean patch cross-entropy against the
  patch labels the model was trained on, over all its patches (or
  ``slides.eval_patches_per_slide`` evenly spaced).

δ is the model's (the run's ``dp.delta``, or 1/n); a model without DP is audited at the δ
the run's DP models have. Each hospital's rows go to ``hospitals/<h>/audit.csv`` and
``audit.json``; with every hospital audited, the run-level ``audit.csv``, ``audit.json``
(all rows, their ROC curves, settings and time) and ``audit_roc.png`` are written to
``RUN_DIR`` or ``-o OUT``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from federation.audit.lira import lira_scores, logit_confidence, shadow_runs
from federation.audit.metrics import CONFIDENCE, LOW_FPRS, AttackResult, score_attack
from federation.audit.records import read_audit_records
from federation.config import FederationConfig, load_config
from federation.data.bags import BagIndex, BagReader
from federation.data.image_clients import chunked_logits
from federation.data.images import as_tensor_dataset, load_images
from federation.evaluation.run import hospital_slides
from federation.evaluation.scoring import evenly_spaced, patch_probabilities
from federation.model_files import load_model
from federation.privacy.statement import UNSTATED, epsilon_label
from federation.run_directory import RunDirectory
from federation.run_files import (
    AUDIT_CSV,
    AUDIT_JSON,
    AUDIT_RECORDS,
    AUDIT_ROC,
    CONFIG,
    HOSPITALS,
    SUMMARY,
)
from federation.seeds import derive_seed
from formats.atomic import atomic_path

log = logging.getLogger(__name__)

COLUMNS = ("hospital", "model", "shared", "dp", "attack", "records", "unit", "members",
           "nonmembers", "auc", *(f"tpr_at_fpr_{f:g}" for f in LOW_FPRS), "epsilon_lb",
           "epsilon_lb_max", "epsilon", "guarantee", "delta", "confidence", "threshold",
           "bound_true_positives", "bound_members", "bound_false_positives", "bound_nonmembers")


class AuditError(ValueError):
    """A run that cannot be audited; ``str()`` is one line naming the file."""


@dataclass(frozen=True)
class AuditSet:
    """One hospital's members and non-members of one kind, as ``losses`` takes them."""

    name: str  # holdout or canary (images), test (slides)
    unit: str  # record or slide
    members: TensorDataset | list[BagIndex]
    nonmembers: TensorDataset | list[BagIndex]
    indices: np.ndarray | None = None  # images: members' then non-members' record indices


def audit_run(run_dir: str | Path, hospitals: Sequence[str] | None = None, *,
              output: str | Path | None = None, attack: str = "loss", shadows: int = 8
              ) -> list[dict[str, Any]]:
    """Audit ``hospitals`` (default: all) of the run in ``run_dir`` with ``attack`` (``loss``,
    or ``lira`` with ``shadows`` shadow runs, trained here unless they exist); returns the
    rows."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG
    if not config_path.is_file():
        raise AuditError(f"{run_dir}: not a run directory (no {CONFIG})")
    config = load_config(config_path)
    names = [config.client_name(c) for c in range(config.clients)]
    chosen = list(names if hospitals is None else hospitals)
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise AuditError(f"{config_path}: no hospital {', '.join(unknown)} in this run")
    if attack == "lira" and (config.data.name == "bags" or not config.audit.holdout):
        raise AuditError(f"{config_path}: LiRA needs an image run with audit.holdout > 0 (its "
                         "shadow runs draw from the holdout members and non-members)")
    if attack == "lira" and shadows < 2:
        raise AuditError(f"{run_dir}: LiRA needs at least 2 shadow runs, not {shadows}")
    run = RunDirectory(run_dir, is_root=True)
    started = time.perf_counter()
    shadow_dirs = shadow_runs(config, run_dir, shadows) if attack == "lira" else []
    shadow_s = time.perf_counter() - started
    rows, curves = [], {}
    for hospital in chosen:
        hospital_rows, hospital_curves = audit_hospital(config, run, hospital, shadow_dirs)
        directory = run.hospital_dir(hospital)
        _write_csv(directory / AUDIT_CSV, hospital_rows)
        _write_json(directory / AUDIT_JSON, _document(config, hospital_rows, hospital_curves))
        rows += hospital_rows
        curves.update(hospital_curves)
    seconds = time.perf_counter() - started
    if hospitals is None:
        target = run_dir if output is None else Path(output)
        document = _document(config, rows, curves)
        document["time"] = {"audit_s": seconds, "shadow_runs_s": shadow_s,
                            "run_wall_s": _run_wall_s(run_dir)}
        _write_csv(target / AUDIT_CSV, rows)
        _write_json(target / AUDIT_JSON, document)
        plot_roc(target / AUDIT_ROC, rows, curves)
    return rows


def audit_hospital(config: FederationConfig, run: RunDirectory, hospital: str,
                   shadow_dirs: Sequence[Path] = ()
                   ) -> tuple[list[dict[str, Any]], dict[str, dict[str, list[float]]]]:
    """The audit rows of every saved model of ``hospital``, and each one's ROC curve (keyed
    ``<hospital>/<model>/<records>``), computed from that hospital's data and models alone:
    the loss attack, or with ``shadow_dirs`` LiRA."""
    sets = hospital_records(config, run, hospital)
    paths = sorted((run.hospital_dir(hospital) / "models").glob("*.pt"))
    if not paths:
        raise AuditError(f"{run.hospital_dir(hospital) / 'models'}: no saved models; did the "
                         "run finish?")
    models = [(path, *load_model(path)) for path in paths]
    run_delta = next((card["privacy"]["delta"] for _, _, card in models
                      if card["privacy"]["dp"] and card["privacy"]["delta"] is not None),
                     config.dp.delta or 1.0 / len(sets[0].members))
    rows, curves = [], {}
    for path, module, card in models:
        privacy = card["privacy"]
        delta = privacy["delta"] if privacy["dp"] and privacy["delta"] else run_delta
        for chosen in sets:
            if shadow_dirs:
                scores = _lira(module, card["model"], chosen, hospital, shadow_dirs)
                scores_in, scores_out = scores[:len(chosen.members)], scores[len(chosen.members):]
            else:
                scores_in = -losses(module, chosen.members, config)
                scores_out = -losses(module, chosen.nonmembers, config)
            try:
                result = score_attack(scores_in, scores_out, delta=delta,
                                      seed=derive_seed(config.seed, "audit", hospital,
                                                       card["model"], chosen.name))
            except ValueError as error:
                raise AuditError(f"{path}: {error}") from None
            rows.append(_row(hospital, card, chosen, result, delta,
                             attack="lira" if shadow_dirs else "loss",
                             counts=(len(scores_in), len(scores_out))))
            fpr, tpr = result.roc
            curves[_curve_key(rows[-1])] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return rows, curves


def _lira(module: nn.Module, model: str, chosen: AuditSet, hospital: str,
          shadow_dirs: Sequence[Path]) -> np.ndarray:
    """LiRA scores (``federation.audit.lira``) of ``chosen``'s members then non-members
    under ``module``, from the same hospital's ``model`` in each shadow run."""
    both = TensorDataset(*(torch.cat(t) for t in zip(chosen.members.tensors,
                                                     chosen.nonmembers.tensors, strict=True)))
    phis, trained = [], []
    for directory in shadow_dirs:
        hospital_dir = directory / HOSPITALS / hospital
        shadow, _ = load_model(hospital_dir / "models" / f"{model}.pt")
        drawn = read_audit_records(hospital_dir / AUDIT_RECORDS)[chosen.name]["member"][0]
        phis.append(logit_confidence(shadow, both))
        trained.append(np.isin(chosen.indices, drawn))
    return lira_scores(logit_confidence(module, both), np.stack(phis), np.stack(trained))


def _curve_key(row: dict[str, Any]) -> str:
    return f"{row['hospital']}/{row['model']}/{row['records']}"


def hospital_records(config: FederationConfig, run: RunDirectory, hospital: str
                     ) -> list[AuditSet]:
    """``hospital``'s members and non-members (see the module docstring)."""
    directory = run.hospital_dir(hospital)
    if config.data.name == "bags":
        slides = hospital_slides(config, run, hospital)
        if len(slides["test"]) < 2:
            raise AuditError(f"{directory / 'splits.csv'}: {len(slides['test'])} test slides; "
                             "an audit needs at least two non-members")
        return [AuditSet("test", "slide", slides["train"], slides["test"])]
    path = directory / AUDIT_RECORDS
    try:
        found = read_audit_records(path)
    except ValueError as error:
        raise AuditError(str(error)) from None
    arrays = load_images(config.data.name, config.data.root, train=True)
    sets = []
    for name, memberships in found.items():
        datasets, indices_of = [], []
        for indices, labels in memberships.values():
            indices_of.append(indices)
            if indices.max() >= len(arrays.labels) or indices.min() < 0:
                raise AuditError(f"{path}: record {int(indices.max())} is outside the "
                                 f"{len(arrays.labels)} training images in {config.data.root}")
            # A holdout record keeps its label, a canary never does.
            agrees = arrays.labels[indices] == labels
            if not (agrees.all() if name == "holdout" else not agrees.any()):
                raise AuditError(f"{path}: {name} labels do not fit the images in "
                                 f"{config.data.root}; is data.root the data set trained on?")
            images, _ = as_tensor_dataset(arrays, indices).tensors
            datasets.append(TensorDataset(images, torch.from_numpy(labels)))
        sets.append(AuditSet(name, "record", *datasets, indices=np.concatenate(indices_of)))
    return sets


@torch.no_grad()
def losses(module: nn.Module, records: TensorDataset | list[BagIndex],
           config: FederationConfig) -> np.ndarray:
    """Each record's cross-entropy under ``module``: an image's, or a slide's mean over its
    patches (``Records``)."""
    module.eval()
    if isinstance(records, TensorDataset):  # images
        return np.concatenate([
            F.cross_entropy(logits, labels, reduction="none").double().cpu().numpy()
            for logits, labels in chunked_logits(module, records)])
    return np.array(list(_slide_losses(module, records, config)))


def _slide_losses(module: nn.Module, bags: list[BagIndex], config: FederationConfig
                  ) -> Iterator[float]:
    reader = BagReader()
    for bag in bags:
        indices = evenly_spaced(bag.n_patches, config.slides.eval_patches_per_slide)
        p = np.clip(patch_probabilities(module, reader, bag, indices), 1e-12, 1 - 1e-12)
        y = bag.patch_labels[indices]
        yield float(-np.mean(np.where(y == 1, np.log(p), np.log1p(-p))))


def _row(hospital: str, card: dict[str, Any], chosen: AuditSet, result: AttackResult,
         delta: float, *, attack: str, counts: tuple[int, int]) -> dict[str, Any]:
    privacy = card["privacy"]
    bound = result.bound
    return {"hospital": hospital, "model": card["model"], "shared": bool(card["shared"]),
            "dp": bool(privacy["dp"]), "attack": attack, "records": chosen.name,
            "unit": chosen.unit,
            "members": counts[0], "nonmembers": counts[1], "auc": result.auc,
            **{f"tpr_at_fpr_{f:g}": t for f, t in result.tpr_at_fpr.items()},
            "epsilon_lb": bound.epsilon_lb, "epsilon_lb_max": result.epsilon_lb_max,
            "epsilon": float(privacy["epsilon"]) if privacy["dp"] else math.inf,
            # what the accountant's ε is (model files before it was stated: not stated)
            "guarantee": epsilon_label(privacy) if "guarantee" in privacy else UNSTATED,
            "delta": delta, "confidence": CONFIDENCE, "threshold": bound.threshold,
            "bound_true_positives": bound.true_positives, "bound_members": bound.members,
            "bound_false_positives": bound.false_positives,
            "bound_nonmembers": bound.nonmembers}


def _document(config: FederationConfig, rows: list[dict[str, Any]],
              curves: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    return {"attack": rows[0]["attack"] if rows else None, "confidence": CONFIDENCE,
            "low_fprs": list(LOW_FPRS),
            "nonmembers": "test slides" if config.data.name == "bags"
            else f"{AUDIT_RECORDS} (audit.holdout = {config.audit.holdout}, audit.canaries = "
                 f"{config.audit.canaries})",
            "threshold_choice": "on a random half of members and non-members; epsilon_lb "
                                "counted on the other half",
            "results": [{k: (None if isinstance(v, float) and math.isinf(v) else v)
                         for k, v in row.items()} for row in rows],
            "roc": curves}


def _run_wall_s(run_dir: Path) -> float | None:
    try:
        return float(json.loads((run_dir / SUMMARY).read_text())["time"]["wall_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _write_json(path: Path, document: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n")


def plot_roc(path: Path, rows: list[dict[str, Any]],
             curves: dict[str, dict[str, list[float]]]) -> None:
    """The attack's ROC curves on log-log axes (Carlini et al. 2022), one panel per model
    name and set of records, one line per hospital, with each panel's mean AUC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(row["model"], row["records"]) for row in rows})
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for axis, (model, records) in zip(axes[0], panels, strict=True):
        chosen = [row for row in rows if (row["model"], row["records"]) == (model, records)]
        floor = 1.0 / max(row["nonmembers"] for row in chosen)
        for row in chosen:
            curve = curves[_curve_key(row)]
            fpr = np.maximum(curve["fpr"], floor / 2)
            axis.plot(fpr, np.maximum(curve["tpr"], floor / 2), lw=1, alpha=0.7)
        axis.plot([floor / 2, 1], [floor / 2, 1], "k--", lw=0.8)
        axis.set(xscale="log", yscale="log", xlim=(floor / 2, 1), ylim=(floor / 2, 1),
                 xlabel="false positive rate", ylabel="true positive rate")
        axis.set_title(f"{model} ({records}): AUC {np.mean([r['auc'] for r in chosen]):.3f}, "
                       f"ε_lb max {max(r['epsilon_lb'] for r in chosen):.2f}", fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)

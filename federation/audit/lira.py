"""The likelihood-ratio attack, LiRA (Carlini, Chien, Nasr, Song, Terzis & Tramèr,
"Membership inference attacks from first principles", IEEE S&P 2022), with shadow runs.

Each shadow run repeats the target run's training (same configuration, another seed) with
every client training on a random ``samples_per_client`` of the target's holdout members
and non-members, and a random half of its canaries if it has some (``audit.shadow_of``),
so each record is in some shadows and out of others. A record's statistic is its
logit-scaled confidence φ = log(p_y / (1 − p_y)) under the model (Carlini et al.,
Sec. IV). Its score under the target model is the log-likelihood ratio
log N(φ; μ_in, σ_in²) − log N(φ; μ_out, σ_out²), with μ_in and μ_out the record's mean φ
over the shadows that did and did not train on it, and one variance per side pooled over
all records — the paper's choice for few shadows. A record that no shadow trained on (or
every shadow did) takes the mean over all records for the side it lacks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from federation.config import FederationConfig, config_from_dict, config_to_dict
from federation.data.image_clients import chunked_logits
from federation.run_files import CONFIG, SHADOWS, SUMMARY
from federation.seeds import derive_seed

log = logging.getLogger(__name__)


@torch.no_grad()
def logit_confidence(module: nn.Module, records: TensorDataset) -> np.ndarray:
    """φ = log p_y − log(1 − p_y) of each record under ``module``, from the logits (stable
    where p_y is within float precision of 1)."""
    module.eval()
    out = []
    for logits, y in chunked_logits(module, records):
        logits = logits.double()
        own = logits.gather(1, y[:, None])[:, 0]
        others = logits.scatter(1, y[:, None], float("-inf")).logsumexp(1)
        out.append((own - others).cpu().numpy())
    return np.concatenate(out)


def lira_scores(target: np.ndarray, shadows: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """The LiRA score of each record: ``target`` (n,) its φ under the audited model,
    ``shadows`` (S, n) its φ under each shadow model, ``trained`` (S, n) whether that shadow
    trained on it."""
    shadows, trained = np.asarray(shadows, dtype=np.float64), np.asarray(trained, dtype=bool)
    if shadows.shape != trained.shape or shadows.shape[1] != len(target):
        raise ValueError(f"lira_scores: shapes {shadows.shape}, {trained.shape} and "
                         f"{len(target)} records disagree")
    scores = np.zeros(len(target))
    for side, sign in ((trained, 1.0), (~trained, -1.0)):
        if not side.any():
            raise ValueError("LiRA needs shadows both in and out of the records")
        counts = side.sum(0)
        sums = np.where(side, shadows, 0.0).sum(0)
        mean = np.where(counts > 0, sums / np.maximum(counts, 1), shadows[side].mean())
        variance = max(float(np.var(shadows[side] - np.broadcast_to(mean, shadows.shape)[side])),
                       1e-12)
        scores += sign * -((target - mean) ** 2) / (2 * variance) - sign * 0.5 * np.log(variance)
    return scores


def shadow_runs(config: FederationConfig, run_dir: Path, count: int) -> list[Path]:
    """The directories of ``count`` shadow runs of the run in ``run_dir`` (configuration
    ``config``), each trained on the local backend unless it has finished already
    (``RUN_DIR/audit_shadows/shadow_<s>``)."""
    from federation.loop import run_federation

    directories = []
    for s in range(count):
        directory = run_dir / SHADOWS / f"shadow_{s}"
        if not (directory / SUMMARY).is_file():
            raw = config_to_dict(config)
            raw.update(seed=derive_seed(config.seed, "lira-shadow", s) % 2**31,
                       output_dir=str(directory), backend="local", checkpoint_every=0,
                       eval_every=config.rounds)
            raw["audit"] = {"holdout": 0, "canaries": 0, "shadow_of": str(run_dir)}
            log.info("LiRA shadow run %d of %d -> %s", s + 1, count, directory)
            run_federation(config_from_dict(raw, source=f"{run_dir / CONFIG} (shadow {s})"),
                           force=True)
        directories.append(directory)
    return directories

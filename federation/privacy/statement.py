"""What every reported ε means: the neighbouring relation, the guarantee labels, one wording.

Torch-free, so the reports and the console read and print privacy without the engine. Each ε
slidefed writes (``privacy.csv``, ``summary.json``, model files, the reports, the console)
carries its unit, its relation and one of the labels below, printed by ``epsilon_label``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

RELATION = "substitution"
"""The neighbouring relation of every ε slidefed reports: two datasets of a hospital with the
same number of privacy units that differ in one unit (replace-one). Unit counts are public
under it, as the protocol needs them (q = B / n, FedAvg's weights, the feature centre's
divisor)."""

THEOREM = "theorem"
STEPS_ONLY = "DP-SGD steps only, not a guarantee"
NOT_PRIVATE = "not private"
UNSTATED = "relation and guarantee not stated (written before slidefed stated them)"

NON_PRIVATE = "non-private statistic, shared by opt-in"
NOT_SHARED = "not shared"
"""How a number computed on a hospital's data without DP (a metric, a timing) is labelled
where it appears: shared with the coordinator only by opt-in (``report.shared_metrics``,
``report.share_timings``), and "not shared" where the hospitals kept it."""
"""How far an ε is a guarantee: ``THEOREM``, (ε, δ)-DP under ``RELATION`` for the stated unit;
``STEPS_ONLY``, the accountant's ε of a DP model that distils from a non-DP teacher
(``dml.beta`` > 0), which bounds nothing; ``NOT_PRIVATE``, a model trained without DP."""


def epsilon_label(privacy: Mapping[str, Any]) -> str:
    """One phrase for an ε's meaning, from a mapping with ``guarantee`` and, for a theorem,
    ``unit`` and ``relation`` (a ``summary.json`` epsilon block, a model file's privacy
    card, a ``privacy.csv`` row): e.g. "(ε, δ)-DP per slide, replace-one"."""
    guarantee = privacy.get("guarantee")
    if guarantee == THEOREM:
        relation = "replace-one" if privacy.get("relation") == RELATION else privacy.get(
            "relation")
        return f"(ε, δ)-DP per {privacy.get('unit', 'unit')}, {relation}"
    return str(guarantee or "no privacy statement")

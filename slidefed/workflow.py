"""The workflow's configuration, checked when Snakemake starts, before any job runs.

The Snakefile validates the structure against ``workflow/schemas/config.schema.yaml`` with
``snakemake.utils.validate`` and then calls ``check_config`` for what a schema cannot see:
hospital names usable as file names, each hospital's slide list (the folder or CSV and its
columns, read as ``slidefed preprocess`` will read it), and every algorithm's federation
configuration (names from ``federation.catalog``, keys and values as ``slidefed federate``
will check them, and the patches it trains on are the tiling's). Each problem is one line
naming the config key.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from typing import Any

from federation import catalog
from federation.config import ConfigError, load_config
from preprocessing.hospital import SlideListError, read_slide_list

# A hospital name becomes directory and file names (preprocessed/<name>/, logs) and a YAML
# list item on the federate command line, so it is kept to a portable file-name alphabet.
_HOSPITAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class WorkflowConfigError(ValueError):
    """A workflow configuration that would fail a job; the message is one line."""


def config_problem(error: Exception) -> str:
    """One line for a refused configuration: ``WorkflowConfigError``'s message, or for what
    ``snakemake.utils.validate`` refused, the key and what is wrong."""
    cause = error.__context__  # validate raises while handling jsonschema's ValidationError
    if not hasattr(cause, "absolute_path"):
        return str(error).splitlines()[0]
    where = ".".join(map(str, cause.absolute_path)) or "top level"
    return f"config: {where}: {cause.message}"


def slide_lists(config: Mapping[str, Any]) -> dict[str, tuple[str, str | None]]:
    """Hospital -> (slide folder or CSV, annotation folder or None), from ``hospitals``."""
    return {name: (value, None) if isinstance(value, str)
            else (value["slides"], value.get("annotations"))
            for name, value in config["hospitals"].items()}


def slide_files(slides: str, annotations: str | None) -> list[str]:
    """The slide and annotation files a hospital's slide list names that exist: the inputs
    of its preprocessing job beside the list itself, so that touching one slide reruns that
    hospital's job and what depends on it. A missing file is left out rather than failing the
    workflow: preprocessing records it as a failed slide. Empty for a list that cannot be read
    (``check_config`` has refused it already, or the demo cohort has not written it yet)."""
    try:
        entries = read_slide_list(slides, annotations)
    except SlideListError:
        return []
    paths = [p for e in entries for p in (e.path, e.annotation) if p is not None]
    return [str(p) for p in paths if p.is_file()]


def preprocess_options(tiling: Mapping[str, Any]) -> str:
    """``tiling`` as options of ``slidefed preprocess``: a flag for true, one per list item."""
    options = []
    for key, value in tiling.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            options += [flag] if value else []
        else:
            options += [f"{flag} {shlex.quote(str(v))}"
                        for v in (value if isinstance(value, list) else [value])]
    return " ".join(options)


def federate_options(config: Mapping[str, Any], algorithm: str) -> str:
    """The ``--set`` options of ``slidefed federate`` for ``algorithm``'s run."""
    return " ".join(f"--set {shlex.quote(o)}" for o in _federate_overrides(config, algorithm))


def _federate_overrides(config: Mapping[str, Any], algorithm: str) -> list[str]:
    """What the workflow sets (run directory, bags, hospitals), then ``federation.set``."""
    out = config["output_dir"]
    return [f"algorithm={algorithm}", f"output_dir={out}/federation/{algorithm}",
            f"data.root={out}/preprocessed",
            "data.hospitals=[" + ",".join(config["hospitals"]) + "]",
            f"clients={len(config['hospitals'])}", *config["federation"].get("set", [])]


def check_config(config: Mapping[str, Any], basedir: str) -> None:
    """Raise ``WorkflowConfigError`` for the first problem a job would meet; see the module.

    ``config`` has passed the schema; ``basedir`` is the Snakefile's directory, against which
    a relative ``federation.config`` is taken. Slide lists that ``demo_cohort`` writes are
    not read (they do not exist yet).
    """
    for name in config["hospitals"]:
        if not _HOSPITAL_NAME.fullmatch(name):
            raise WorkflowConfigError(
                f"config: hospitals: {name!r} is not a valid file name (use letters, digits, "
                "'.', '_' and '-', starting with a letter or digit)")
    federation = config.get("federation")
    demo = config.get("demo_cohort")
    if demo is not None:
        if demo["hospitals"] != len(config["hospitals"]):
            raise WorkflowConfigError(
                f"config: demo_cohort.hospitals is {demo['hospitals']} but hospitals names "
                f"{len(config['hospitals'])}")
    else:
        for name, (slides, annotations) in slide_lists(config).items():
            try:
                entries = read_slide_list(slides, annotations)
            except SlideListError as error:
                raise WorkflowConfigError(f"config: hospitals.{name}: {error}") from None
            if federation and all(e.label == "" for e in entries):
                raise WorkflowConfigError(
                    f"config: hospitals.{name}: {slides}: no slide has a label, which "
                    "training needs: list the slides in a CSV slide_id,path,label[,annotation]")
    if not federation:
        return
    path = os.path.join(basedir, federation["config"])
    if not os.path.isfile(path):
        raise WorkflowConfigError(f"config: federation.config: {path}: no such file")
    for algorithm in federation["algorithms"]:
        if algorithm not in catalog.ALGORITHMS:
            raise WorkflowConfigError(
                f"config: federation.algorithms: unknown algorithm {algorithm!r}; choose from "
                f"{', '.join(catalog.ALGORITHMS)}")
        try:
            run = load_config(path, _federate_overrides(config, algorithm))
        except ConfigError as error:
            raise WorkflowConfigError(f"config: federation ({algorithm}): {error}") from None
        tiling = config.get("tiling", {})
        for key, trained in (("mpp", run.slides.target_mpp), ("patch_size", run.slides.patch_size)):
            if key in tiling and tiling[key] != trained:
                raise WorkflowConfigError(
                    f"config: tiling.{key} is {tiling[key]} but federation ({algorithm}) trains "
                    f"on {trained}; make them match")

"""The round loop: set up clients and algorithm, run the rounds, evaluate, account, checkpoint.

``run_federation(config)`` is what ``slidefed federate`` runs on every process (one per MPI
rank, or one for all clients on the local backend). Before any data are read, the processes
agree on where to start (``federation.run_directory.agree_on_start``). Per round: the algorithm
trains and communicates; each DP model's ε is computed once; every ``eval_every`` rounds (and
after the last) each model of each client is scored on that client's test set; each hospital
appends all its rows to its own ``hospitals/<h>/metrics.csv`` / ``privacy.csv`` and sends the
coordinator (the root process) its ε, and only by opt-in the metrics ``report.shared_metrics``
names, for the run's files; at the end each process sends the elements its clients sent and, by
opt-in (``report.share_timings``), its timings. Every ``checkpoint_every`` rounds (and after
the last) every process checkpoints its hospitals into their own directories. ``resume=True``
continues from the last checkpoint every hospital has and gives the same files as an
uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from federation import run_files
from federation.algorithms import ALGORITHMS, Algorithm
from federation.client import LocalModel
from federation.config import ConfigError, FederationConfig
from federation.cores import usable_cores
from federation.data import ClientData, load_client_data
from federation.model_files import save_decision, save_model
from federation.models import check_timm_names
from federation.privacy.statement import NON_PRIVATE, NOT_PRIVATE, NOT_SHARED, RELATION
from federation.run_directory import RunDirectory, agree_on_start
from federation.transport.comm import (
    LAUNCH_HINT,
    Communicator,
    launched_processes,
    make_communicator,
)

log = logging.getLogger(__name__)

# Environment variables by which MPI launchers announce a rank (MPICH/hydra and Intel MPI,
# Open MPI, PMIx) and the number of ranks on this node.
_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
_LOCAL_SIZE_VARIABLES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``mpi`` inside an MPI launcher (mpiexec, srun), else ``local``.

    ``local`` inside a launch of several processes is refused: each process would run the
    whole federation, all of them into one output directory. So is ``auto`` when the launcher
    started several processes none of which is an MPI rank (``srun`` without ``--mpi=pmi2``).
    """
    resolved = backend
    if backend == "auto":
        resolved = "mpi" if any(v in os.environ for v in _RANK_VARIABLES) else "local"
    launched = launched_processes()
    if resolved == "local" and launched > 1:
        if backend == "auto":
            raise ConfigError(f"the launcher started {launched} processes but none is an MPI "
                              "rank, so each would train every client alone; start MPI ranks "
                              f"({LAUNCH_HINT}), or one process")
        raise ConfigError(f"backend local under an MPI launch of {launched} processes would run "
                          f"{launched} whole federations into one output_dir; use --backend "
                          "mpi, or start one process")
    return resolved


def configure_threads(config: FederationConfig, comm: Communicator) -> int:
    """Set torch's intra-op threads: ``config.threads`` (default 1 on every backend), or with
    null this node's cores shared among the processes on it (one thread per rank when R ranks
    share fewer than 2R cores, all of them for the local backend's one process). A process
    trains its clients one after another, so the threads are per process, not per client."""
    threads = config.threads
    if threads is None:
        cores = usable_cores()
        processes = 1
        if comm.processes > 1:
            local = next((os.environ[v] for v in _LOCAL_SIZE_VARIABLES if v in os.environ), None)
            processes = int(local) if local else comm.processes
        threads = max(1, cores // processes)
    torch.set_num_threads(threads)
    return threads


def run_federation(
    config: FederationConfig, comm: Communicator | None = None, *, resume: bool = False,
    force: bool = False,
) -> dict[str, Any] | None:
    """Run (or with ``resume`` continue) the federation ``config`` describes.

    ``comm`` defaults to the communicator of ``config.backend``. ``force`` overwrites a
    finished or checkpointed run in ``output_dir`` (otherwise refused). Returns the summary
    (also written to ``summary.json``) on the root process, None elsewhere.
    """
    started = time.perf_counter()
    if comm is None:
        comm = make_communicator(resolve_backend(config.backend), config.clients)
    if comm.size != config.clients:
        raise ValueError(f"clients = {config.clients} but the communicator has {comm.size}")
    comm.configure(timeout_s=config.comm_timeout_s,
                   names=[config.client_name(c) for c in range(comm.size)])
    # What can be checked without the data (models, output directory), before loading it.
    check_timm_names(config.model)
    run = RunDirectory(config.output_dir, is_root=comm.is_root)
    run.check_writable()
    names = {c: config.client_name(c) for c in comm.owned}
    facts = comm.allgather({c: run.start_facts(config, names[c], coordinator=c == 0)
                            for c in comm.owned})
    completed = agree_on_start(facts, [config.client_name(c) for c in range(comm.size)],
                               config.rounds, resume=resume, force=force)
    if completed:
        run.resume(config, names.values(), completed)
    else:
        run.start(config, names.values())
    threads = configure_threads(config, comm)
    data = load_client_data(config, comm.owned)
    algorithm: Algorithm = ALGORITHMS[config.algorithm](config, comm, data)
    # The totals of the rounds before a resume: this process's times, and each client's
    # elements sent (the clients may have been packed into processes differently then).
    earlier: dict[str, Any] = {"wall_s": 0.0, "seconds": {}, "sent_by_client": {}}
    if completed:
        for c in comm.owned:
            state = run.load_client(completed, names[c])
            algorithm.load_state_dict(c, state["algorithm"])
            if c == comm.owned[0]:
                earlier.update(wall_s=state["process"]["wall_s"],
                               seconds=state["process"]["seconds"])
            earlier["sent_by_client"][c] = state["process"]["elements_sent"]
        for category, seconds in earlier["seconds"].items():
            algorithm.stopwatch.seconds[category] += seconds
    else:
        algorithm.prepare()
    for c in comm.owned:
        data[c].write_records(run.hospital_dir(names[c]))
    comm.barrier()
    if comm.is_root:
        log.info("%s: %d clients (%d in this process, %d torch threads each process), "
                 "rounds %d-%d, output %s", config.algorithm, config.clients, len(comm.owned),
                 threads, completed + 1, config.rounds, run.root)

    latest: dict[str, Any] = {}
    rounds = tqdm(range(completed, config.rounds), initial=completed, total=config.rounds,
                  desc=config.algorithm, unit="round",
                  disable=None if comm.is_root else True)  # None: only on a terminal
    for t in rounds:
        number = t + 1
        losses = algorithm.run_round(t)
        privacy = algorithm.privacy()
        rows: dict[int, list[dict[str, Any]]] = {c: [] for c in comm.owned}
        for c, spent in privacy.items():
            rows[c].append({"file": "privacy", "round": number, "client": c,
                            **spent._asdict(), "unit": data[c].unit})
        if number % config.eval_every == 0 or number == config.rounds:
            for c, models in algorithm.evaluate().items():
                rows[c] += _metric_rows(number, c, models, losses.get(c, {}),
                                        data[c].eval_split)
        for c in comm.owned:
            run.append(rows[c], hospital=names[c])
        gathered = comm.gather_rows({c: _shared_rows(rows[c], config) for c in comm.owned})
        if gathered is not None:
            run.append(gathered)
            latest = _update_latest(latest, gathered)
            _show_progress(rounds, latest, algorithm.reported_model)
        if number == config.rounds or (
            config.checkpoint_every and number % config.checkpoint_every == 0
        ):
            _checkpoint(run, algorithm, comm, number, earlier, started, names)

    with algorithm.stopwatch("evaluation"):
        _save_final_models(run, algorithm, data, config)
    comm.barrier()
    process = {"file": "process", **_process_totals(algorithm, comm, earlier, started)}
    processes = comm.gather_rows({c: [_shared_process_row(process, config)]
                                  if c == comm.owned[0] else [] for c in comm.owned})
    if processes is None:
        return None
    if not latest:  # resumed a finished run: the final rows are on disk already
        latest = _latest_from_files(run)
    summary = _summary(config, algorithm, latest, processes, process["wall_s"], completed)
    run.write_summary(summary)
    return summary


def _save_final_models(run: RunDirectory, algorithm: Algorithm, data: Mapping[int, ClientData],
                       config: FederationConfig) -> None:
    """Every model of every client of this process, as ``federation.model_files`` describes,
    under its hospital's own directory, with its decision card beside it."""
    for c, client in algorithm.clients.items():
        for name, model in client.models.items():
            role = algorithm.roles[name]
            options = {"num_classes": data[c].num_classes, **data[c].model_options()}
            path = run.hospital_dir(data[c].name) / "models" / f"{name}.pt"
            # The threshold and a fitted slide head are chosen on the hospital's own slides
            # without DP: its private decision card, never inside the model file.
            decision = data[c].calibrate(model.module)
            if decision:
                save_decision(path, decision, hospital=data[c].name, model=name)
            save_model(
                path, model.module,
                architecture=getattr(config.model, role.architecture), model_options=options,
                hospital=data[c].name, model=name, algorithm=config.algorithm,
                round=config.rounds, seed=config.seed, shared=role.leaves_client,
                data=data[c].describe(), decision={},
                privacy=_privacy_card(model, data[c].unit, algorithm.guarantee))


def _privacy_card(model: LocalModel, unit: str, guarantee: str) -> dict[str, Any]:
    """What a model file says of its privacy: (ε, δ), the unit, the relation and whether ε
    is a theorem for a DP model; "not private", and no ε, for a model trained without DP."""
    if not model.is_private:
        return {"dp": False, "epsilon": None, "delta": None, "unit": unit,
                "guarantee": NOT_PRIVATE}
    return {"dp": True, "epsilon": model.epsilon(), "delta": model.delta, "unit": unit,
            "relation": RELATION, "guarantee": guarantee}


def _metric_rows(
    number: int, client: int, models: Mapping[str, Mapping[str, float]],
    losses: Mapping[str, float], split: str,
) -> list[dict[str, Any]]:
    rows = []
    for model, metrics in models.items():
        for metric, value in metrics.items():
            rows.append({"file": "metrics", "round": number, "client": client, "model": model,
                         "split": split, "metric": metric, "value": value})
        if model in losses:
            rows.append({"file": "metrics", "round": number, "client": client, "model": model,
                         "split": "train", "metric": "loss", "value": losses[model]})
    return rows


def _shared_rows(rows: list[dict[str, Any]], config: FederationConfig) -> list[dict[str, Any]]:
    """What a hospital sends the coordinator of its round's rows: its ε (the report and
    every reader of the run need it) and, by opt-in, the metrics ``report.shared_metrics``
    names (none by default: they are computed on its data and not covered by DP)."""
    return [row for row in rows if row["file"] == "privacy"
            or config.report.shares(row["model"], row["split"], row["metric"])]


def _shared_process_row(process: dict[str, Any], config: FederationConfig) -> dict[str, Any]:
    """What a process sends the coordinator at the end: the elements its clients sent (a count
    of what crossed its rank, which the receivers saw anyway) and, by opt-in
    (``report.share_timings``), its wall time and seconds per category."""
    if config.report.share_timings:
        return process
    return {"file": "process", "elements_sent": process["elements_sent"]}


def _process_totals(algorithm: Algorithm, comm: Communicator, earlier: Mapping[str, Any],
                    started: float) -> dict[str, Any]:
    """This process's wall time, seconds per category and elements sent over the whole run:
    ``earlier`` holds the totals of the rounds before a resume (the stopwatch has them)."""
    return {"wall_s": earlier["wall_s"] + time.perf_counter() - started,
            "seconds": dict(algorithm.stopwatch.seconds),
            "elements_sent": sum(_sent_by(comm, earlier, c) for c in comm.owned)}


def _sent_by(comm: Communicator, earlier: Mapping[str, Any], client: int) -> int:
    """Elements ``client`` has sent over the whole run, the rounds before a resume included."""
    return earlier["sent_by_client"].get(client, 0) + sum(
        t.numel for t in comm.sent_log if t.src == client)


def _checkpoint(run: RunDirectory, algorithm: Algorithm, comm: Communicator, number: int,
                earlier: Mapping[str, Any], started: float, names: Mapping[int, str]) -> None:
    with algorithm.stopwatch("checkpointing"):
        process = _process_totals(algorithm, comm, earlier, started)
        for c in comm.owned:
            # The process's times, but only this client's elements: a resume may pack the
            # clients into processes differently.
            run.save_client(number, names[c], {
                "round": number, "algorithm": algorithm.state_dict(c),
                "process": {**process, "elements_sent": _sent_by(comm, earlier, c)}})
        comm.barrier()  # every hospital holds this round now: older checkpoints may go
        for c in comm.owned:
            run.keep_only_checkpoint(names[c], number)


def _update_latest(latest: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Keep the most recent test metrics and ε per client (root only)."""
    for row in rows:
        if row["file"] == "metrics" and row["split"] != "train":
            latest.setdefault("metrics", {})[row["model"], row["metric"], row["client"]] = (
                row["value"])
        elif row["file"] == "privacy":
            latest.setdefault("privacy", {})[row["client"]] = (row["epsilon"], row["delta"])
    return latest


def _latest_from_files(run: RunDirectory) -> dict[str, Any]:
    metrics = [dict(row, value=float(row["value"]), client=int(row["client"]), file="metrics")
               for _, row in run_files.read_rows(run.metrics_path, run_files.METRICS_COLUMNS)]
    privacy = [dict(row, epsilon=float(row["epsilon"]), delta=float(row["delta"]),
                    client=int(row["client"]), file="privacy")
               for _, row in run_files.read_rows(run.privacy_path, run_files.PRIVACY_COLUMNS)]
    return _update_latest({}, metrics + privacy)


def _show_progress(rounds: tqdm, latest: dict[str, Any], model: str) -> None:
    accuracies = [v for (m, metric, _), v in latest.get("metrics", {}).items()
                  if m == model and metric == "accuracy"]
    postfix = {}
    if accuracies:
        postfix[f"{model}_acc"] = f"{np.mean(accuracies):.3f}"
    epsilons = [eps for eps, _ in latest.get("privacy", {}).values()]
    if epsilons:
        postfix["eps"] = f"{max(epsilons):.2f}"
    rounds.set_postfix(postfix, refresh=False)


def _stats(values: list[float]) -> dict[str, Any]:
    return {"per_client": values, "mean": float(np.mean(values)), "std": float(np.std(values))}


def _summary(
    config: FederationConfig,
    algorithm: Algorithm,
    latest: dict[str, Any],
    processes: list[dict[str, Any]],
    wall: float,
    resumed_from: int,
) -> dict[str, Any]:
    final: dict[str, dict[str, Any]] = {}
    for (model, metric, client), value in sorted(latest.get("metrics", {}).items()):
        final.setdefault(model, {}).setdefault(metric, {})[client] = value
    results = {model: {metric: _stats([by_client[c] for c in sorted(by_client)])
                       for metric, by_client in metrics.items()}
               for model, metrics in final.items()}
    privacy = latest.get("privacy", {})
    timed = [p for p in processes if "seconds" in p]
    categories = sorted({k for p in timed for k in p["seconds"]})
    shared_metrics = "report.shared_metrics"
    return {
        "algorithm": config.algorithm,
        "rounds": config.rounds,
        "clients": config.clients,
        "seed": config.seed,
        "data": config.data.name,
        "reported_model": algorithm.reported_model,
        "final": results,
        "epsilon": None if not privacy else {
            "per_client": [privacy[c][0] for c in sorted(privacy)],
            "max": max(eps for eps, _ in privacy.values()),
            "delta": [privacy[c][1] for c in sorted(privacy)],
            "unit": config.slides.privacy_unit if config.data.name == "bags" else "record",
            "relation": RELATION,
            "guarantee": algorithm.guarantee,
        },
        "time": {
            "wall_s": wall,
            # Per category the slowest process: what the run waited for.
            **{f"{k}_s": max(p["seconds"].get(k, 0.0) for p in timed) for k in categories},
        },
        "elements_sent": int(sum(p["elements_sent"] for p in processes)),
        "resumed_from_round": resumed_from or None,
        # What of the above is not covered by DP and came from the hospitals by opt-in.
        "non_private": {
            "final": f"{NON_PRIVATE} ({shared_metrics})" if results
            else f"{NOT_SHARED} ({shared_metrics})",
            "time": f"{NON_PRIVATE} (report.share_timings)" if config.report.share_timings
            else f"{NOT_SHARED} (report.share_timings); wall_s is the coordinator's own",
        },
    }

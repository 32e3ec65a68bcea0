"""Everything that crosses from one client to another, checked against the list in
docs/privacy.md ("What crosses a rank").

A recording communicator (the local backend, through the same public methods the MPI
backend implements) logs every tensor and every pickled object each client hands it; every
message of a short run of each algorithm must be one the list names, and no private model or
raw data may be among them. ``tests/federation/test_federate_mpi.py`` checks the same under a real
``mpiexec`` at the level of mpi4py's calls.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from federation_synthetic import small_config, write_synthetic_digits
from slide_bags import slide_config

from federation.algorithms import ALGORITHMS, Algorithm
from federation.config import config_from_dict
from federation.loop import run_federation
from federation.models.scattering import NUM_FEATURES
from federation.privacy.statement import NON_PRIVATE, NOT_SHARED
from federation.run_directory import StartFacts
from federation.transport.comm import LocalCommunicator

# The fields of each kind of pickled row (``federation.loop``), as docs/privacy.md lists them; a
# run that opts in to sharing its timings (report.share_timings) adds them to "process".
ROW_FIELDS = {
    "privacy": {"file", "round", "client", "epsilon", "delta", "unit", "status", "relation",
                "guarantee"},
    "metrics": {"file", "round", "client", "model", "split", "metric", "value"},
    "process": {"file", "elements_sent"},
}
TIMINGS = {"wall_s", "seconds"}


def fields_as_listed(row: dict[str, Any], share_timings: bool) -> bool:
    """Whether ``row`` has the fields docs/privacy.md lists for its kind."""
    listed = ROW_FIELDS[row["file"]]
    if row["file"] == "process" and share_timings:
        listed = listed | TIMINGS
    return set(row) == listed
# The tensors each algorithm sends, as docs/privacy.md lists them: (operation, what it is).
TENSORS = {
    "regular": set(),
    "regular_dp": set(),
    "proxyfl": {("exchange", "proxy")},
    "avgpush": {("exchange", "shared")},
    "cwt": {("exchange", "shared")},
    "fedavg": {("allreduce", "weighted shared")},
    "fml": {("allreduce", "weighted shared")},
    "joint": {("allreduce", "steps per epoch"), ("allreduce", "gradient sum")},
}


class Message(NamedTuple):
    """One thing client ``src`` handed the communicator: ``op``, a copy of ``payload`` and,
    for a tensor, a copy of the sender's models' parameters at that moment."""

    op: str
    src: int
    payload: Any
    models: dict[str, torch.Tensor]


class RecordingCommunicator(LocalCommunicator):
    """The local backend, logging every tensor and object a client sends, as it sends it;
    ``algorithm`` (set once it is built) says what the senders' models are."""

    def __init__(self, num_clients: int) -> None:
        super().__init__(num_clients)
        self.messages: list[Message] = []
        self.algorithm: Algorithm | None = None

    def _record(self, op: str, by_client: Mapping[int, Any]) -> None:
        for c, payload in by_client.items():
            if isinstance(payload, torch.Tensor):
                clients = getattr(self.algorithm, "clients", {})
                models = {name: model.flat.pack().clone()
                          for name, model in clients[c].models.items()} if c in clients else {}
                self.messages.append(Message(op, c, payload.clone(), models))
            else:
                self.messages.append(Message(op, c, copy.deepcopy(payload), {}))

    def exchange(self, outgoing, send_to, recv_from):
        self._record("exchange", {c: t for c, t in outgoing.items() if send_to[c]})
        return super().exchange(outgoing, send_to, recv_from)

    def allreduce_sum(self, local):
        self._record("allreduce", local)
        return super().allreduce_sum(local)

    def broadcast(self, tensor_by_owner, root):
        self._record("broadcast", {root: tensor_by_owner[root]})
        return super().broadcast(tensor_by_owner, root)

    def gather_rows(self, rows_by_owner):
        self._record("gather_rows", rows_by_owner)
        return super().gather_rows(rows_by_owner)

    def allgather(self, by_owner):
        self._record("allgather", by_owner)
        return super().allgather(by_owner)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_synthetic_digits(tmp_path_factory.mktemp("digits"))


def _run(digits: Path, out: Path, monkeypatch, algorithm: str, *, default_report: bool = False,
         **overrides: Any) -> tuple[RecordingCommunicator, Algorithm]:
    """A 2-round run of ``algorithm`` (LeNet-5 private, MLP proxy: their sizes differ) that
    records its messages; opted in to sharing metrics and timings (the tests' configs), or
    with ``default_report`` the defaults (nothing non-private shared)."""
    raw = small_config(digits, out, algorithm=algorithm, rounds=2, checkpoint_every=1,
                       **{"model.private": "lenet5", "fedavg.client_fraction": 0.5,
                          **overrides})
    if default_report:
        del raw["report"]
    return _recorded(config_from_dict(raw), monkeypatch)


def _recorded(config, monkeypatch) -> tuple[RecordingCommunicator, Algorithm]:
    """Run ``config`` on a recording communicator."""
    comm = RecordingCommunicator(config.clients)
    cls = ALGORITHMS[config.algorithm]
    real_init = cls.__init__

    def init(self, *args, **kwargs):
        comm.algorithm = self
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__init__", init)
    run_federation(config, comm)
    monkeypatch.undo()
    return comm, comm.algorithm


def _tensor_kind(message: Message, algorithm: Algorithm) -> str:
    """What a tensor message is, by comparison with its sender's models; ``unknown`` if none."""
    tensor, config = message.payload, algorithm.config
    for name, params in message.models.items():
        if algorithm.roles[name].leaves_client and message.op == "exchange" and torch.equal(
                tensor, params):
            return name
        if message.op != "allreduce" or tensor.numel() != params.numel() + 1:
            continue
        weight = float(tensor[-1])
        if config.algorithm == "joint":  # [Σ gradients, batch size]: not a model, no DP
            return "gradient sum" if weight <= config.optim.batch_size else "unknown"
        if not algorithm.roles[name].leaves_client:
            continue
        units = algorithm.clients[message.src].data.num_units
        if weight == 0 and not tensor[:-1].any():
            return f"weighted {name}"
        if weight == units and torch.allclose(tensor[:-1] / weight, params.to(torch.float64)):
            return f"weighted {name}"
    if (message.op == "allreduce" and tensor.numel() == NUM_FEATURES + 1
            and tensor[-1] == algorithm.clients[message.src].data.num_units):
        return "feature sums"  # [DP sum of the slides' mean features, slide count]
    if message.op == "allreduce" and tensor.numel() == config.clients:
        others = torch.cat([tensor[:message.src], tensor[message.src + 1:]])
        if not others.any():  # a client fills only its own slot
            return "steps per epoch"
    return "unknown"


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_only_the_listed_messages_cross(digits: Path, tmp_path: Path, monkeypatch,
                                        name: str) -> None:
    comm, algorithm = _run(digits, tmp_path, monkeypatch, name)
    config = algorithm.config
    private = {model.flat.numel for model_name, model in algorithm.clients[0].models.items()
               if not algorithm.roles[model_name].leaves_client and name != "joint"}

    tensors = [m for m in comm.messages if isinstance(m.payload, torch.Tensor)]
    for message in tensors:
        assert not {message.payload.numel(), message.payload.numel() - 1} & private, (
            "a private model crossed")
    assert {(m.op, _tensor_kind(m, algorithm)) for m in tensors} == TENSORS[name]

    objects = [m for m in comm.messages if not isinstance(m.payload, torch.Tensor)]
    assert {m.op for m in objects} == {"allgather", "gather_rows"}
    starts = [m for m in objects if m.op == "allgather"]
    assert [m.src for m in starts] == list(range(config.clients))  # once per run, each client
    assert all(isinstance(m.payload, StartFacts) and
               all(isinstance(v, str | tuple | type(None)) for v in m.payload) for m in starts)
    rows = [(m.src, row) for m in objects if m.op == "gather_rows" for row in m.payload]
    for src, row in rows:
        assert fields_as_listed(row, config.report.share_timings), row
        assert all(isinstance(v, int | float | str | dict) for v in row.values()), row
        if row["file"] != "process":
            assert row["client"] == src  # a client sends only its own rows
        if row["file"] == "metrics":
            assert config.report.shares(row["model"], row["split"], row["metric"])
            assert row["split"] != "train", "a training loss crossed"
    kinds_of_rows = {row["file"] for _, row in rows}
    assert kinds_of_rows == {"metrics", "process"} | ({"privacy"} if any(
        model.is_private for model in algorithm.clients[0].models.values()) else set())


def test_shared_metrics_choose_what_reaches_the_coordinator(digits: Path, tmp_path: Path,
                                                            monkeypatch) -> None:
    comm, _ = _run(digits, tmp_path, monkeypatch, "proxyfl",
                      **{"report.shared_metrics": ["proxy/*/*"]})
    rows = [row for m in comm.messages if m.op == "gather_rows" for row in m.payload
            if row["file"] == "metrics"]
    assert {(r["model"], r["split"], r["metric"]) for r in rows} == {
        ("proxy", "test", "accuracy"), ("proxy", "test", "loss"), ("proxy", "train", "loss")}
    # the hospitals keep every row; the coordinator's file has what they sent
    own = (tmp_path / "hospitals" / "client_0" / "metrics.csv").read_text()
    assert ",private,train,loss," in own and ",private," not in (tmp_path / "metrics.csv"
                                                                  ).read_text()


def test_a_fixed_feature_proxy_adds_only_its_dp_feature_sums(bag_cohort, tmp_path: Path,
                                                            monkeypatch) -> None:
    root, hospitals = bag_cohort
    config = config_from_dict(slide_config(root, tmp_path, hospitals[:2], rounds=1,
                                           **{"model.proxy": "scattering_linear"}))
    comm, algorithm = _recorded(config, monkeypatch)
    tensors = [m for m in comm.messages if isinstance(m.payload, torch.Tensor)]
    kinds = [(m.op, _tensor_kind(m, algorithm)) for m in tensors]
    assert set(kinds) == {("exchange", "proxy"), ("allreduce", "feature sums")}
    sums = [m for m, kind in zip(tensors, kinds, strict=True) if kind[1] == "feature sums"]
    assert [m.src for m in sums] == [0, 1]  # once per run, before training
    assert tensors.index(sums[-1]) < min(i for i, k in enumerate(kinds) if k[0] == "exchange")


@pytest.mark.parametrize("name", ["proxyfl", "regular"])
def test_by_default_no_metric_and_no_timing_reaches_the_coordinator(
        digits: Path, tmp_path: Path, monkeypatch, name: str) -> None:
    comm, algorithm = _run(digits, tmp_path, monkeypatch, name, default_report=True)
    config = algorithm.config
    assert config.report.shared_metrics == () and not config.report.share_timings
    rows = [(m.src, row) for m in comm.messages if m.op == "gather_rows" for row in m.payload]
    assert {row["file"] for _, row in rows} == {"process"} | (
        {"privacy"} if name == "proxyfl" else set())  # ε: the DP release; regular has none
    for _, row in rows:
        assert fields_as_listed(row, share_timings=False), row  # no wall time, no seconds
    # The hospitals keep every row; the coordinator's files hold no metric and say so.
    own = (tmp_path / "hospitals" / "client_0" / "metrics.csv").read_text()
    assert all(f",{model},test,accuracy," in own for model in algorithm.clients[0].models)
    assert (tmp_path / "metrics.csv").read_text().strip().count("\n") == 0  # a header only
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final"] == {}
    assert set(summary["time"]) == {"wall_s"}  # the coordinator's own: nothing was sent
    assert summary["non_private"]["final"].startswith(NOT_SHARED)
    assert summary["non_private"]["time"].startswith(NOT_SHARED)
    # counted from what crossed ranks, which the receivers saw anyway
    assert (summary["elements_sent"] > 0) == (name == "proxyfl")


def test_an_opted_in_run_shares_metrics_and_timings_labelled(digits: Path, tmp_path: Path,
                                                            monkeypatch) -> None:
    comm, _ = _run(digits, tmp_path, monkeypatch, "proxyfl", **{
        "report.shared_metrics": ["*/test/accuracy"], "report.share_timings": True})
    rows = [row for m in comm.messages if m.op == "gather_rows" for row in m.payload]
    assert {r["file"] for r in rows} == {"privacy", "metrics", "process"}
    assert all(set(r) >= TIMINGS for r in rows if r["file"] == "process")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final"]["private"]["accuracy"]["per_client"]
    assert {"wall_s", "training_s", "communication_s"} <= set(summary["time"])
    assert summary["non_private"] == {"final": f"{NON_PRIVATE} (report.shared_metrics)",
                                      "time": f"{NON_PRIVATE} (report.share_timings)"}

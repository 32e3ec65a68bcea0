"""The secret streams DP draws from: their numbers, their state, and that the key stays at home.

The adversary is every other hospital and the coordinator: they see every message, the shared
configuration and every shared file. A hospital's key may only lie in its own checkpoints.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from federation_synthetic import small_config, write_synthetic_digits
from scipy import stats
from test_messages import RecordingCommunicator

from federation.config import config_from_dict
from federation.loop import run_federation
from federation.privacy.randomness import SecretStream, fixed_secrets_for_tests


def test_uniforms_and_normals_have_their_distributions() -> None:
    stream = SecretStream.fresh("test")
    u = stream.uniform("a", 100_000)
    assert u.min() > 0 and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-6
    z = stream.normal("b", (300, 301), 2.5, dtype=torch.float64).flatten().numpy()
    assert z.shape == (90_300,)  # an odd count: the last Box-Muller pair is cut
    assert stats.kstest(z / 2.5, "norm").pvalue > 1e-6
    mask = stream.poisson_mask("c", 200_000, 0.1)
    assert mask.dtype == torch.bool and abs(float(mask.float().mean()) - 0.1) < 0.005


def test_purposes_are_separate_streams_and_the_state_continues_exactly() -> None:
    stream = SecretStream(bytes(range(32)))
    first = stream.uniform("noise", 4)
    saved = stream.state_dict()
    after = stream.uniform("noise", 4)
    assert not np.array_equal(first, after)
    assert not np.array_equal(SecretStream(bytes(range(32))).uniform("sampling", 4), first)
    restored = SecretStream(bytes(32))
    restored.load_state_dict(saved)
    assert np.array_equal(restored.uniform("noise", 4), after)
    with pytest.raises(ValueError, match="key of 3 bytes"):
        SecretStream(b"abc")


def test_fresh_keys_differ_and_fixed_test_keys_repeat_and_say_so(caplog) -> None:
    assert SecretStream.fresh("h/proxy").state_dict() != SecretStream.fresh("h/proxy").state_dict()
    with caplog.at_level(logging.WARNING), fixed_secrets_for_tests(3):
        a, b = SecretStream.fresh("h/proxy"), SecretStream.fresh("h/proxy")
        other = SecretStream.fresh("g/proxy")
    assert a.state_dict() == b.state_dict() != other.state_dict()
    assert "keyed from a fixed test seed: NOT secret" in caplog.text
    assert SecretStream.fresh("h/proxy").state_dict() != a.state_dict()  # the block ended


def _shared_bytes(run: Path) -> dict[str, bytes]:
    """Every file of the run a peer or the coordinator may see: all but the hospitals'
    checkpoints (their private state)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*")
            if p.is_file() and "checkpoints" not in p.parts}


@pytest.mark.parametrize("algorithm", ["proxyfl", "fedavg"])
def test_no_message_shared_file_or_log_holds_a_hospitals_key(tmp_path: Path, monkeypatch,
                                                            caplog, algorithm: str) -> None:
    digits = write_synthetic_digits(tmp_path / "digits")
    config = config_from_dict(small_config(digits, tmp_path / "run", algorithm=algorithm,
                                           rounds=2, checkpoint_every=1))
    comm = RecordingCommunicator(config.clients)
    with caplog.at_level(logging.DEBUG):
        run_federation(config, comm)
    keys = []
    for c in range(config.clients):
        checkpoint = tmp_path / "run" / "hospitals" / f"client_{c}" / "checkpoints"
        state = torch.load(next(checkpoint.glob("round_*.pt")), weights_only=True)
        for model in state["algorithm"].values():
            if model["privacy"] is not None:
                keys.append(model["privacy"]["secret"]["key"])
    assert len(keys) == config.clients and len(set(keys)) == config.clients
    forms = [form for key in keys for form in (key.encode(), bytes.fromhex(key))]
    messages = pickle.dumps([(m.op, m.src, m.payload) for m in comm.messages])
    shared = _shared_bytes(tmp_path / "run")
    shared_model = "proxy.pt" if algorithm == "proxyfl" else "shared.pt"
    assert "config.yaml" in shared and any(name.endswith(shared_model) for name in shared)
    for form in forms:
        assert form not in messages
        assert form not in caplog.text.encode()
        for name, content in shared.items():
            assert form not in content, f"{name} holds a hospital's secret key"

"""Secret randomness: the only source of the random draws a DP guarantee rests on.

Differential privacy holds only if the adversary cannot predict the mechanism's randomness.
slidefed's adversary is every other hospital and the coordinator (docs/privacy.md): they
hold the shared configuration, its seed included, so nothing derived from the seed may
decide which slides a DP step samples or what noise it adds. Every DP mechanism of a
hospital therefore draws from a ``SecretStream``: SHAKE-256 (FIPS 202, an extendable-output
function used as a stream cipher) keyed by 256 bits from the operating system's CSPRNG
(``secrets.token_bytes``), drawn when the model is built and kept only in the hospital's
own checkpoints, so its own resume continues the stream exactly. Each draw hashes
key ‖ purpose ‖ counter, so draws for different purposes (sampling, noise, the feature
centre) are independent streams and the state to save is (key, counters).

Gaussian noise comes from 53-bit uniforms by the Box-Muller transform in float64, then is
cast to the gradient's dtype. Two known limits remain, stated rather than hidden: like
opacus outside its secure mode, the sampler is not hardened against floating-point attacks
on the Gaussian's low-order bits (Mironov, CCS 2012; Haney et al., arXiv 2207.10635);
and the key lives in the hospital's checkpoint files, so whoever reads that directory can
regenerate the noise (the hospital's own staff; peers never receive it).

Tests that compare two runs bit for bit (MPI against the local backend, two packings,
resume) need the same "secret" twice: ``fixed_secrets_for_tests`` derives every key from a
test seed and the stream's label. It is a Python context manager, not a setting: no run
configuration, command-line option or environment variable reaches it, and while it is
active every stream logs that it is not secret.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

KEY_BYTES = 32
_TEST_SEED: int | None = None


@contextmanager
def fixed_secrets_for_tests(seed: int) -> Iterator[None]:
    """Within this block every new ``SecretStream`` is keyed by ``seed`` and its label, so two
    runs draw the same "secret" numbers. For tests of bit-equality only: it removes privacy."""
    global _TEST_SEED
    previous, _TEST_SEED = _TEST_SEED, seed
    try:
        yield
    finally:
        _TEST_SEED = previous


def _fresh_key(label: str) -> bytes:
    if _TEST_SEED is None:
        return secrets.token_bytes(KEY_BYTES)
    log.warning("secret stream %r keyed from a fixed test seed: NOT secret, no privacy", label)
    return hashlib.shake_256(f"slidefed-test-secret\0{_TEST_SEED}\0{label}".encode()).digest(
        KEY_BYTES)


class SecretStream:
    """Random draws from one secret 256-bit key: uniforms, Poisson masks and Gaussian noise.

    ``SecretStream.fresh(label)`` draws a new key (``label`` names the stream in logs and, under
    ``fixed_secrets_for_tests``, keys it). ``state_dict`` holds the key: keep it only where
    the hospital keeps its private state.
    """

    def __init__(self, key: bytes, counters: dict[str, int] | None = None) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"SecretStream: key of {len(key)} bytes, expected {KEY_BYTES}")
        self._key = key
        self._counters: dict[str, int] = dict(counters or {})

    @classmethod
    def fresh(cls, label: str) -> SecretStream:
        """A stream with a new key from the operating system's CSPRNG."""
        return cls(_fresh_key(label))

    def _bytes(self, purpose: str, count: int) -> bytes:
        counter = self._counters.get(purpose, 0)
        self._counters[purpose] = counter + 1
        message = self._key + purpose.encode() + b"\0" + counter.to_bytes(8, "little")
        return hashlib.shake_256(message).digest(count)

    def uniform(self, purpose: str, count: int) -> np.ndarray:
        """``count`` independent uniforms in (0, 1), float64 with 53 random bits each."""
        words = np.frombuffer(self._bytes(purpose, 8 * count), dtype="<u8")
        return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53

    def poisson_mask(self, purpose: str, count: int, rate: float) -> torch.Tensor:
        """(count,) bool: each entry True independently with probability ``rate``."""
        return torch.from_numpy(self.uniform(purpose, count) < rate)

    def normal(self, purpose: str, shape: tuple[int, ...] | torch.Size, std: float, *,
               dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> torch.Tensor:
        """Independent N(0, std²) entries of ``shape`` (Box-Muller in float64)."""
        count = int(np.prod(shape, dtype=np.int64))
        pairs = (count + 1) // 2
        u = self.uniform(purpose, 2 * pairs).reshape(2, pairs)
        radius = np.sqrt(-2.0 * np.log(u[0]))
        angle = 2.0 * np.pi * u[1]
        values = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]
        return torch.from_numpy(values * std).reshape(shape).to(dtype=dtype, device=device)

    def state_dict(self) -> dict[str, Any]:
        """The key and the number of draws per purpose: everything to continue the stream."""
        return {"key": self._key.hex(), "counters": dict(self._counters)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._key = bytes.fromhex(state["key"])
        self._counters = dict(state["counters"])

"""Seeds for every random choice of a run, derived from the run's one seed."""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(seed: int, *purpose: str | int) -> int:
    """A 63-bit seed for ``purpose`` (e.g. ``"init", "proxy", 3``) drawn from the run's seed.

    Strings are hashed with BLAKE2 (not ``hash()``, which differs between processes), so every
    process derives the same seed for the same purpose.
    """
    words = [seed]
    for part in purpose:
        if isinstance(part, str):
            words.append(int.from_bytes(hashlib.blake2b(part.encode(), digest_size=4).digest()))
        else:
            words.append(int(part))
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1

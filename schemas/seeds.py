"""One way to derive a seed, shared by the data stream and the trainer's noise, so their draws never collide."""

from __future__ import annotations

import hashlib

import numpy as np


def seed_of(*parts: int | str) -> int:
    """A 64-bit seed from non-negative ints and strings (strings hashed): distinct tuples give independent streams,
    so every draw can be a pure function of counters (seed, rank, step, …) and no RNG state is checkpointed."""
    ints = [
        p if isinstance(p, int) else int.from_bytes(hashlib.sha1(p.encode()).digest()[:8], "little")
        for p in parts
    ]
    return int(np.random.SeedSequence(ints).generate_state(1, np.uint64)[0])

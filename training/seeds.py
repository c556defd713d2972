"""Seeds of a training run: per-step seeds, scoped RNG states and the ``(m, n)`` pair draws.

What makes ``--resume`` exact and multi-process runs equal to one process (with :mod:`.data`):
:func:`derive_seed` gives per-step seeds (the ``(m, n)`` pair, mixup/cutmix, drop path), so a run
resumed at step ``K`` draws exactly what the uninterrupted run drew at step ``K``; :func:`seeded_rngs`
runs one sample's augmentation under RNGs seeded with ``(seed, key)`` and restores them afterwards.
Global seeding is ``accelerate.utils.set_seed``.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Iterator, List, Tuple

import numpy as np
import torch

__all__ = ["derive_seed", "seeded_rngs", "sample_pair", "heldout_pairs"]


def derive_seed(*parts: object) -> int:
    """A 31-bit seed that is a stable function of ``parts`` (no Python hash salt, no global state)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Run a block under ``random`` / NumPy / torch (CPU) RNGs seeded with ``seed``; restore them after.

    Seeds only the CPU generator (``torch.default_generator``), which is all ``torch.manual_seed`` seeds
    on the CPU: ``torch.manual_seed`` would also queue a lazy seeding of every accelerator backend, and
    each queued call formats a stack trace (about 0.5 ms per sample in a loader worker).
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = torch.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.default_generator.set_state(torch_state)


def sample_pair(seed: int, step: int, r_max: int) -> Tuple[int, int]:
    """The ``(m, n)`` pair of optimizer step ``step``: uniform over ordered pairs ``m != n`` in ``[0, R]``.

    A pure function of ``(seed, step)``, so every process and a resumed run draw the same pair.
    """
    rng = random.Random(derive_seed(seed, "pair", step))
    m = rng.randint(0, r_max)
    n = rng.randint(0, r_max - 1)
    return m, (n + 1 if n >= m else n)


def heldout_pairs(seed: int, r_max: int, k: int) -> List[Tuple[int, int]]:
    """``k`` distinct ordered pairs ``m != n`` for the held-out KL, a fixed function of ``seed``."""
    pairs = [(m, n) for m in range(r_max + 1) for n in range(r_max + 1) if m != n]
    rng = random.Random(derive_seed(seed, "heldout-pairs"))
    rng.shuffle(pairs)
    return sorted(pairs[: min(k, len(pairs))])

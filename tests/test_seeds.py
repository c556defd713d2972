"""Seeds of a training run (training/seeds.py): the (m, n) pair draws and scoped RNG states."""

from __future__ import annotations

import random

import numpy as np
import torch

from tocom_hub.training import seeds


def test_pair_sampling_is_uniform_and_stable():
    from collections import Counter

    heldout_pairs, sample_pair = seeds.heldout_pairs, seeds.sample_pair
    assert sample_pair(0, 123, 10) == sample_pair(0, 123, 10)
    counts = Counter(sample_pair(0, s, 3) for s in range(6000))
    assert set(counts) == {(m, n) for m in range(4) for n in range(4) if m != n}
    assert min(counts.values()) > 0.7 * 6000 / 12
    pairs = heldout_pairs(0, 10, 8)
    assert len(set(pairs)) == 8 and all(m != n for m, n in pairs) and pairs == heldout_pairs(0, 10, 8)


def test_seeded_rngs_seed_like_manual_seed_and_restore():
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(6)
    before = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(6)
    with seeds.seeded_rngs(42):
        inside = (torch.rand(4), random.random(), np.random.rand())
    after = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(after[0], before[0]) and after[1:] == before[1:]  # outer streams untouched
    torch.manual_seed(42)
    random.seed(42)
    np.random.seed(42)
    assert torch.equal(inside[0], torch.rand(4)) and inside[1:] == (random.random(), np.random.rand())

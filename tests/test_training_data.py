"""The data side of a training run (training/data.py)."""

from __future__ import annotations

import torch

from tocom_hub.training.data import InMemory


def test_in_memory_dataset_reads_sampler_keys_modulo_length():
    data = [(torch.full((3, 2, 2), float(i)), i) for i in range(5)]
    cached = InMemory(data, batch_size=2)
    assert len(cached) == 5
    x, y = cached[7]  # EpochSampler key: epoch 1, index 2
    assert int(y) == 2 and torch.equal(x, data[2][0])

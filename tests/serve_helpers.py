"""Shared pieces of the serving tests: image bodies, the demo model with a "poison" input that makes its
forward fail (for the 5xx path), and the in-process reference forward."""

from __future__ import annotations

import io
from typing import List

import numpy as np
import torch
from PIL import Image

POISON = (255, 0, 0)  # a uniformly pure-red image makes the poisoned model's forward raise


def png(seed: int, size: int = 40) -> bytes:
    """A random RGB image as PNG bytes."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def poison_png(size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), POISON).save(buf, format="PNG")
    return buf.getvalue()


def _raise_on_poison(module, args):
    x = args[0].flatten(2)  # [B, 3, H*W]
    flat = (x.amax(-1) == x.amin(-1)).all(-1)
    red = (x[:, 0, 0] > x[:, 1, 0]) & (x[:, 1, 0] == x[:, 2, 0])
    if bool((flat & red).any()):
        raise RuntimeError("poisoned input")


def poisoned_demo():
    """The demo model (source r = 0) whose forward raises on a uniformly pure-red image."""
    from tocom_hub.demo import load_demo_model

    model = load_demo_model(0).model
    model.patch_embed.register_forward_pre_hook(_raise_on_poison)
    return model


def probs(results: List[dict]) -> torch.Tensor:
    """``[N, k]`` top-k probabilities of a list of results, ordered by class index."""
    rows = []
    for res in results:
        pairs = sorted((t["index"], t["prob"]) for t in res["top_k"])
        rows.append([p for _, p in pairs])
    return torch.tensor(rows)


def indices(results: List[dict]) -> List[List[int]]:
    return [sorted(t["index"] for t in res["top_k"]) for res in results]

"""tqdm progress bars for the tools: on by default, ``progress=False`` or ``TQDM_DISABLE=1`` turns them off."""

from __future__ import annotations

from typing import Any


def progress_bar(iterable: Any = None, *, progress: bool = True, **kwargs: Any):
    """``tqdm.auto.tqdm(iterable, **kwargs)``; ``disable`` is left to tqdm (and its ``TQDM_*`` environment
    overrides) unless ``progress`` is false."""
    from tqdm.auto import tqdm

    if not progress:
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)

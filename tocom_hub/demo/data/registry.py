"""The registry of embedded datasets: :func:`register_dataset` adds a builder under a name,
:func:`build_dataset` builds one split of it, :func:`list_datasets` / :func:`get_dataset_spec` look them up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from torch.utils.data import Dataset

from ...core.checks import is_int

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "eval": "val",
    "test": "test",
}
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class DatasetSpec:
    """A registered embedded dataset.

    Attributes:
        name: registry name (``--data NAME`` in the training scripts).
        builder: ``builder(split=..., img_size=..., length=..., seed=...) -> Dataset``.
        num_classes: number of labels.
        description: one line for ``--help`` and logs.
        lengths: default number of items per split.
        license: where the pixels come from and under which terms.
        task: ``"classification"`` (items ``(image, int)``) or ``"segmentation"`` (items ``(image, [H, W]
            int64 mask)``); classification tools refuse a segmentation dataset.
    """

    name: str
    builder: Callable[..., Dataset]
    num_classes: int
    description: str
    lengths: Dict[str, int]
    license: str
    task: str = "classification"


TASKS = ("classification", "segmentation")
_REGISTRY: Dict[str, DatasetSpec] = {}


def register_dataset(
    name: str,
    *,
    num_classes: int,
    description: str,
    lengths: Dict[str, int],
    license: str,
    task: str = "classification",
) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Decorator registering ``builder(split, img_size, length, seed) -> Dataset`` under ``name``.

    Example::

        @register_dataset("my-set", num_classes=10, description="…", lengths={"train": 1000, "val": 200,
                          "test": 200}, license="CC0")
        def _build(split, img_size, length, seed):
            return MyDataset(split, img_size, length, seed)
    """
    if name in _REGISTRY:
        raise ValueError(f"an embedded dataset named {name!r} is already registered")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}; got {task!r}")
    missing = [s for s in SPLITS if s not in lengths]
    if missing:
        raise ValueError(f"lengths must give a default size for every split {SPLITS}; missing {missing}")

    def wrap(builder: Callable[..., Dataset]) -> Callable[..., Dataset]:
        _REGISTRY[name] = DatasetSpec(name, builder, num_classes, description, dict(lengths), license, task)
        return builder

    return wrap


def canonical_split(split: str) -> str:
    """``"train"``, ``"val"`` or ``"test"`` for a split name or alias (``"validation"``, ``"eval"``, …)."""
    if split not in _SPLIT_ALIASES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_ALIASES)}; got {split!r}")
    return _SPLIT_ALIASES[split]


def list_datasets() -> List[str]:
    """Names of the registered embedded datasets."""
    return sorted(_REGISTRY)


def get_dataset_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` registered as ``name`` (``KeyError`` with the known names otherwise)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no embedded dataset named {name!r}; known: {list_datasets()}") from None


def build_dataset(
    name: str, split: str = "train", img_size: int = 32, *, length: Optional[int] = None, seed: int = 0
) -> Dataset:
    """Build the embedded dataset ``name`` for ``split`` (``train`` / ``val`` / ``test``).

    Args:
        name: a name from :func:`list_datasets`.
        split: ``"train"``, ``"val"`` (aliases ``"validation"``, ``"eval"``) or ``"test"``.
        img_size: side of the square images returned.
        length: number of items (default: the dataset's size for that split).
        seed: dataset seed; the images are a pure function of ``(seed, split, index)``.

    The returned dataset has ``num_classes``, ``classes`` and ``license`` attributes. Example::

        val = build_dataset("photo-crops", "val", img_size=32, length=256)
        print(len(val), val.num_classes, val.classes[:3])
    """
    spec = get_dataset_spec(name)
    split = canonical_split(split)
    if not is_int(img_size) or img_size < 4:
        raise ValueError(f"img_size must be an int >= 4; got {img_size!r}")
    n = spec.lengths[split] if length is None else length
    if not is_int(n) or n < 1:
        raise ValueError(f"length must be a positive int; got {length!r}")
    ds = spec.builder(split=split, img_size=img_size, length=n, seed=seed)
    ds.license = spec.license
    return ds

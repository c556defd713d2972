"""Pieces the training scripts share: backbone, data, deterministic sampling, checkpoints.

Everything here is a plain function or a tiny class that a script calls top to bottom; the scripts
themselves (``distill.py``, ``finetune.py``, ``evaluate.py``) stay the readable part. Imports are
absolute (``tocom_hub.training.common``) so that ``python training/distill.py`` works as well as
``python -m tocom_hub.training.distill`` and ``accelerate launch``.

Determinism (what makes ``--resume`` exact and multi-process runs equal to one process):

* :class:`EpochSampler` yields *global keys* ``epoch · N + i`` in a permutation that depends only on
  ``(seed, epoch)`` — not on the number of processes, the number of workers or the history.
  ``accelerate`` then hands process ``p`` the batches ``p, p + P, …`` of that stream, so the global
  batch of every step is the same set of samples whatever ``P`` is.
* :class:`SeededTransform` runs the (random) augmentation of key ``k`` under RNGs seeded with
  ``(seed, k)`` and restores the previous RNG states afterwards: a sample's augmentation does not
  depend on which worker made it or on what ran before.
* :func:`derive_seed` gives per-step seeds (the ``(m, n)`` pair, mixup/cutmix, drop path), so a run
  resumed at step ``K`` draws exactly what the uninterrupted run drew at step ``K``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

import tocom_hub
from tocom_hub.core.checks import is_int
from tocom_hub.demo import data as embedded_data
from tocom_hub.demo.models import DEMO_MODEL, DEMO_MODEL_KWARGS, DEMO_WEIGHTS

__all__ = [
    "evaluate_top1",
    "EMBEDDED_MODEL",
    "EMBEDDED_MODEL_KWARGS",
    "EMBEDDED_CHECKPOINT",
    "EMBEDDED_R_MAX",
    "derive_seed",
    "seed_everything",
    "seeded_rngs",
    "sample_pair",
    "heldout_pairs",
    "EpochSampler",
    "SeededTransform",
    "add_model_args",
    "add_data_args",
    "add_accelerate_args",
    "check_common_args",
    "build_backbone",
    "build_datasets",
    "build_transforms",
    "build_train_loader",
    "split_transform",
    "collate_uint8",
    "device_batch",
    "resolve_report_to",
    "use_cpu",
    "TrainState",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "find_checkpoint",
    "sha256_file",
    "write_json",
]

# ---------------------------------------------------------------------------------------------------
# the embedded default backbone: a 6-block, 96-dim, 3-head timm ViT on 32 px images (64 patches of
# 4 px + class token), pre-trained on the embedded "photo-crops" task. Its weights ship with the
# package (1.4 MB, fp16); `training/finetune.py --data photo-crops --from-scratch ...` rebuilds them
# (the exact command is in the file's metadata and in README.md).

EMBEDDED_MODEL = DEMO_MODEL
EMBEDDED_MODEL_KWARGS: Dict[str, Any] = DEMO_MODEL_KWARGS
EMBEDDED_DATA = "photo-crops"
EMBEDDED_DOWNSTREAM_DATA = "photo-orientation"
EMBEDDED_CHECKPOINT = DEMO_WEIGHTS
# R such that >= ~90 % of the 64 patch tokens are merged by the last of the 6 blocks
# (65 → 55 → 45 → 35 → 25 → 15 → 8 tokens with ToMe; DeiT-B at r = 16 merges 192 of 196).
EMBEDDED_R_MAX = 10


# ---------------------------------------------------------------------------------------------------
# seeds


def derive_seed(*parts: object) -> int:
    """A 31-bit seed that is a stable function of ``parts`` (no Python hash salt, no global state)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's legacy global RNG (timm's Mixup uses it) and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


# ---------------------------------------------------------------------------------------------------
# deterministic data order


class EpochSampler(Sampler):
    """A seeded shuffle that yields global keys ``epoch · N + i`` (decode with ``divmod(key, N)``).

    The permutation of epoch ``e`` depends only on ``(seed, e)``; the epoch length is cut to a multiple
    of ``multiple_of`` (the global batch times the accumulation steps) so that every optimizer step
    sees full batches on every process and epochs end on step boundaries. Call :meth:`set_epoch`
    before iterating (``accelerate``'s prepared loaders forward ``set_epoch`` too).
    """

    def __init__(self, num_items: int, seed: int, shuffle: bool = True, multiple_of: int = 1) -> None:
        if num_items < multiple_of:
            raise ValueError(
                f"the dataset has {num_items} items, fewer than one optimizer step needs ({multiple_of} = "
                f"batch size × processes × accumulation steps); use a smaller --batch-size or more data"
            )
        self.num_items, self.seed, self.shuffle = num_items, seed, shuffle
        self.length = num_items - num_items % multiple_of
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", self.epoch))
            order = torch.randperm(self.num_items, generator=g)[: self.length].tolist()
        else:
            order = range(self.length)
        base = self.epoch * self.num_items
        return iter([base + i for i in order])


class SeededTransform(Dataset):
    """``dataset`` with a transform whose randomness is a function of ``(seed, key)`` only.

    Accepts the global keys of :class:`EpochSampler` (``epoch · N + i``; plain indices work too) and
    returns ``(transform(image), label)``.
    """

    def __init__(self, dataset: Dataset, transform: Any, seed: int) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int):
        index = key % len(self.dataset)
        img, label = self.dataset[index]
        if self.transform is not None:
            with seeded_rngs(derive_seed(self.seed, "sample", key)):
                img = self.transform(img)
        return img, label


class InMemory(Dataset):
    """``dataset`` (items ``(image tensor, label)`` from a deterministic transform) decoded once.

    Indexing takes the global keys of :class:`EpochSampler` like :class:`SeededTransform` does. Use it
    only when the transform has no randomness (evaluation, ``--no-augment``): every epoch / every
    target r then reads the same tensors instead of decoding or rendering the images again.
    """

    def __init__(self, dataset: Dataset, batch_size: int = 256, num_workers: int = 0) -> None:
        xs, ys = [], []
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
            xs.append(x)
            ys.append(torch.as_tensor(y))
        self.images, self.labels = torch.cat(xs), torch.cat(ys)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int):
        index = key % len(self.labels)
        return self.images[index], self.labels[index]


def fits_in_memory(num_images: int, img_size: int, limit_mb: int) -> bool:
    """Whether ``num_images`` fp32 RGB images of side ``img_size`` take at most ``limit_mb`` MiB."""
    return num_images * 3 * img_size * img_size * 4 <= limit_mb * 2**20


# ---------------------------------------------------------------------------------------------------
# command line


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backbone")
    g.add_argument(
        "--model",
        default=None,
        help=f"timm model name. Default: the embedded tiny ViT ({EMBEDDED_MODEL} with "
        f"{EMBEDDED_MODEL_KWARGS}, weights shipped with tocom-hub).",
    )
    g.add_argument(
        "--model-kwargs",
        default=None,
        metavar="JSON",
        help="extra keyword arguments for timm.create_model as a JSON object, e.g. '{\"depth\": 6}'",
    )
    g.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights for --model")
    g.add_argument(
        "--checkpoint",
        default=None,
        metavar="PATH",
        help="backbone weights: a state_dict file (.safetensors, or a torch file loaded with "
        "weights_only=True; 'model'/'state_dict' nesting is unwrapped)",
    )
    g.add_argument(
        "--img-size", type=int, default=None, help="input resolution (default: the model's; 32 for the embedded model)"
    )
    g.add_argument("--method", default="tome", choices=tocom_hub.METHODS, help="token reduction (default: tome)")
    g.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate of the backbone (default 0.1)")


def add_data_args(p: argparse.ArgumentParser, default_data: str) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default=None,
        metavar="DIR|NAME",
        help=f"an ImageFolder root in ImageNet layout (train/ and val/ sub-folders), an embedded "
        f"dataset name ({', '.join(embedded_data.list_datasets())}), or a timm dataset name "
        f"with prefix: hfds/<hf-dataset> (Hugging Face datasets, map-style), "
        f"hfids/<hf-dataset> (streamed), wds/<name> (webdataset; --data-dir gives the shards). "
        f"Default: {default_data} (embedded, offline).",
    )
    g.add_argument("--data-dir", default=None, help="root folder / cache dir passed to timm.data.create_dataset")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="validation")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process (default 2)")
    g.add_argument(
        "--no-augment",
        action="store_true",
        help="no RandAugment / random erasing / mixup / cutmix (plain resize + normalise)",
    )


def add_accelerate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="out", help="where checkpoints, metrics and exports go (default out/)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=None, help="images per process per micro-step")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    g.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="accelerator.save_state every N optimizer steps (0: never)",
    )
    g.add_argument(
        "--resume",
        default=None,
        metavar="DIR|latest",
        help="resume from a checkpoint dir, or 'latest' under OUTPUT_DIR/checkpoints",
    )
    g.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="K",
        help="stop after optimizer step K without exporting (simulates a preemption; "
        "the schedule still runs to --max-steps / --epochs)",
    )
    g.add_argument(
        "--report-to",
        default="none",
        choices=["none", "tensorboard", "wandb", "all"],
        help="experiment trackers (only those installed)",
    )
    g.add_argument("--log-every", type=int, default=10, help="log loss / lr every N steps")
    g.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")


def _positive(p: argparse.ArgumentParser, args: argparse.Namespace, names: Sequence[str], allow_zero=()) -> None:
    for name in names:
        v = getattr(args, name)
        if v is None:
            continue
        low = 0 if name in allow_zero else 1
        if v < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}; got {v}")


def check_common_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate the shared flags before anything heavy runs (``p.error`` exits with status 2)."""
    _positive(p, args, ["max_steps", "epochs", "batch_size", "grad_accum", "img_size", "log_every"])
    _positive(p, args, ["checkpoint_every", "num_workers"], allow_zero=("checkpoint_every", "num_workers"))
    if args.stop_after is not None and args.stop_after < 1:
        p.error(f"--stop-after must be >= 1; got {args.stop_after}")
    if not 0.0 <= args.drop_path < 1.0:
        p.error(f"--drop-path must be in [0, 1); got {args.drop_path}")
    if args.model_kwargs is not None:
        try:
            kw = json.loads(args.model_kwargs)
        except json.JSONDecodeError as e:
            p.error(f"--model-kwargs is not valid JSON ({e}); example: --model-kwargs '{{\"depth\": 6}}'")
        if not isinstance(kw, dict):
            p.error(f"--model-kwargs must be a JSON object; got {args.model_kwargs!r}")
        args.model_kwargs = kw
    if args.pretrained and args.checkpoint:
        p.error("--pretrained and --checkpoint are exclusive: pick timm's weights or your own file")
    if args.model is None and args.pretrained:
        p.error("--pretrained needs --model (the embedded tiny ViT has no timm weights; its own are loaded by default)")
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint}: no such file (expected a .safetensors or torch state_dict file)")
    if args.data is not None and not (
        os.path.isdir(args.data) or args.data in embedded_data.list_datasets() or "/" in args.data
    ):
        p.error(
            f"--data {args.data!r} is neither a directory, an embedded dataset "
            f"({', '.join(embedded_data.list_datasets())}) nor a timm dataset name like hfds/<name>"
        )
    if args.data is not None and "/" in args.data and not os.path.isdir(args.data):
        prefix = args.data.split("/", 1)[0].lower()
        if prefix not in ("hfds", "hfids", "wds", "tfds", "torch"):
            p.error(
                f"--data {args.data!r}: no such directory, and {prefix!r} is not a timm dataset prefix "
                f"(hfds/, hfids/, wds/, tfds/, torch/)"
            )
    if args.resume not in (None, "latest") and not os.path.isdir(args.resume):
        p.error(f"--resume {args.resume}: no such checkpoint directory (or use --resume latest)")
    problem = output_dir_problem(args.output_dir)
    if problem:
        p.error(f"--output-dir {args.output_dir}: {problem}; pick a directory you can write to")
    if args.report_to in ("tensorboard", "wandb"):
        from accelerate.utils import is_tensorboard_available, is_wandb_available

        ok = is_tensorboard_available() if args.report_to == "tensorboard" else is_wandb_available()
        if not ok:
            p.error(f"--report-to {args.report_to}: the package is not installed (pip install {args.report_to})")


def output_dir_problem(path: str) -> Optional[str]:
    """Why checkpoints and exports could not be written under ``path`` (``None``: they can).

    Checked before any training, by writing and removing a small file in ``path`` — or, when it does
    not exist yet, in the nearest existing parent (nothing is created: the run makes the folder).
    """
    target = Path(path).expanduser()
    probe_dirs = []
    if target.exists():
        if not target.is_dir():
            return "exists and is not a directory"
        probe_dirs.append(target)
        if (target / "checkpoints").exists():
            probe_dirs.append(target / "checkpoints")
    else:
        parent = target.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            return f"{parent} is a file, not a directory"
        probe_dirs.append(parent)
    for d in probe_dirs:
        try:
            fd, probe = tempfile.mkstemp(prefix=".tocom-write-test-", dir=d)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            return f"cannot write into {d} ({e.strerror or e})"
    return None


def use_cpu(args: argparse.Namespace) -> bool:
    """``Accelerator(cpu=...)``: ``--cpu``, or a multi-process launch (torchrun / accelerate) on a machine
    without CUDA — accelerate only sets up its gloo CPU backend when told the run is on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return bool(args.cpu) or (world > 1 and not torch.cuda.is_available())


def resolve_report_to(value: str) -> Optional[List[str]]:
    """``--report-to`` → ``Accelerator(log_with=...)`` (``all`` keeps the installed trackers)."""
    if value == "none":
        return None
    if value == "all":
        from accelerate.utils import is_tensorboard_available, is_wandb_available

        found = [n for n, ok in (("tensorboard", is_tensorboard_available()), ("wandb", is_wandb_available())) if ok]
        return found or None
    return [value]


# ---------------------------------------------------------------------------------------------------
# backbone


def _read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    from timm.models import load_state_dict

    try:
        sd = load_state_dict(path, use_ema=False, weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path}: cannot read a state_dict ({type(e).__name__}: {e}); expected a .safetensors file or a "
            f"torch file saved with torch.save(model.state_dict()) (loaded with weights_only=True)"
        ) from None
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}


def build_backbone(
    args: argparse.Namespace, num_classes: Optional[int] = None, drop_path: Optional[float] = None
) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The timm backbone described by ``--model / --model-kwargs / --pretrained / --checkpoint``.

    ``num_classes=None`` keeps the checkpoint's (or timm's pretrained) classifier; an int replaces the
    head when it differs (``reset_classifier``). Returns ``(model, info)``; ``info`` records what was
    built and from which weights (for recipes and the bank config).
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    embedded = args.model is None
    name = EMBEDDED_MODEL if embedded else args.model
    kwargs: Dict[str, Any] = dict(EMBEDDED_MODEL_KWARGS) if embedded else {}
    kwargs.update(args.model_kwargs or {})
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    checkpoint = args.checkpoint
    if embedded and checkpoint is None and not getattr(args, "from_scratch", False):
        checkpoint = str(EMBEDDED_CHECKPOINT)
        if not EMBEDDED_CHECKPOINT.is_file():
            raise FileNotFoundError(
                f"the embedded backbone weights are missing ({EMBEDDED_CHECKPOINT}); rebuild them with the "
                f"command in README.md ('Embedded default backbone') or pass --checkpoint"
            )
    state_dict = _read_state_dict(checkpoint) if checkpoint else None
    ckpt_classes: Optional[int] = None
    if state_dict is not None:
        head = state_dict.get("head.weight")
        ckpt_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else 0
    build_classes = ckpt_classes if ckpt_classes is not None else num_classes
    create_kwargs = dict(kwargs)
    if build_classes is not None:
        create_kwargs["num_classes"] = build_classes
    dp = args.drop_path if drop_path is None else drop_path
    model = timm.create_model(name, pretrained=bool(args.pretrained), drop_path_rate=dp, **create_kwargs)
    if state_dict is not None:
        if isinstance(model, VisionTransformer):
            state_dict = checkpoint_filter_fn(state_dict, model)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{checkpoint} does not fit {name} {kwargs}: missing keys {missing[:6]}"
                f"{'…' if len(missing) > 6 else ''}, unexpected keys {unexpected[:6]}"
                f"{'…' if len(unexpected) > 6 else ''}; pass the matching "
                f"--model / --model-kwargs"
            )
    if num_classes is not None and model.num_classes != num_classes:
        model.reset_classifier(num_classes)
    info = {
        "model": name,
        "model_kwargs": kwargs,
        "embedded": embedded,
        "weights": ("timm-pretrained:" + str(model.pretrained_cfg.get("tag")))
        if args.pretrained
        else (f"file:{os.path.basename(checkpoint)}" if checkpoint else "random-init"),
        "checkpoint_sha256": sha256_file(checkpoint) if checkpoint else None,
        "num_classes": int(model.num_classes),
    }
    return model, info


# ---------------------------------------------------------------------------------------------------
# data


def build_datasets(
    args: argparse.Namespace,
    default_data: str,
    img_size: int,
    *,
    need_val: bool = True,
    seed: int = 0,
    val_length: Optional[int] = None,
):
    """``(train, val, info)`` raw datasets (items ``(PIL image, label)``; transforms are added later).

    ``val`` is ``None`` when ``need_val`` is false. ``info`` has ``data``, ``kind`` (``embedded`` /
    ``folder`` / ``timm``), ``num_classes`` (or ``None`` when unknown) and ``iterable``.
    """
    from timm.data import create_dataset

    data = args.data or default_data
    if data in embedded_data.list_datasets():
        spec = embedded_data.get_dataset_spec(data)
        train = embedded_data.build_dataset(data, "train", img_size, seed=seed)
        # the held-out split asked for (--val-split / evaluate.py --split: validation or test)
        split = embedded_data.canonical_split(getattr(args, "val_split", None) or "val")
        # ``seed`` redraws the training images only: the held-out images are the same for every seed
        # (dataset seed 0), so that runs with different seeds are measured on the same test set
        val = (
            embedded_data.build_dataset(
                data, split, img_size, seed=0, length=min(val_length, spec.lengths[split]) if val_length else None
            )
            if need_val
            else None
        )
        return (
            train,
            val,
            {
                "data": data,
                "kind": "embedded",
                "num_classes": spec.num_classes,
                "iterable": False,
                "license": spec.license,
            },
        )
    if os.path.isdir(data):
        train = create_dataset("", root=data, split=args.train_split, is_training=True)
        val = create_dataset("", root=data, split=args.val_split) if need_val else None
        if need_val and os.path.realpath(getattr(val.reader, "root", "")) == os.path.realpath(
            getattr(train.reader, "root", "x")
        ):
            raise ValueError(
                f"{data}: no '{args.val_split}' (or val/) sub-folder next to '{args.train_split}'; "
                f"the held-out set must be separate images"
            )
        num_classes = len(getattr(train.reader, "class_to_idx", {}) or {}) or None
        return train, val, {"data": data, "kind": "folder", "num_classes": num_classes, "iterable": False}
    # timm dataset names: hfds/…, hfids/…, wds/…, tfds/…, torch/…
    common = dict(root=args.data_dir, batch_size=args.batch_size or 1, seed=seed)
    train = create_dataset(data, split=args.train_split, is_training=True, **common)
    val = create_dataset(data, split=args.val_split, is_training=False, **common) if need_val else None
    num_classes = None
    reader = getattr(train, "reader", None)
    if reader is not None and getattr(reader, "class_to_idx", None):
        num_classes = len(reader.class_to_idx)
    return (
        train,
        val,
        {"data": data, "kind": "timm", "num_classes": num_classes, "iterable": isinstance(train, IterableDataset)},
    )


def build_transforms(model: torch.nn.Module, img_size: int, augment: bool, embedded: bool):
    """``(train_transform, eval_transform, data_config)`` from timm's data pipeline.

    Augmentation is DeiT's (as in the ToCom paper): ``RandomResizedCrop`` + flip, RandAugment
    ``rand-m9-mstd0.5-inc1``, random erasing 0.25 (pixel mode); mixup/cutmix are batch-level and
    applied in the training loop. Embedded datasets are already at ``img_size`` (no resize/centre crop).
    """
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({}, model=model)
    cfg["input_size"] = (3, img_size, img_size)
    if embedded:
        cfg["crop_pct"] = 1.0
    common = dict(input_size=cfg["input_size"], interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"])
    eval_tf = create_transform(
        **common, is_training=False, crop_pct=cfg["crop_pct"], crop_mode=cfg.get("crop_mode", "center")
    )
    if augment:
        train_tf = create_transform(
            **common, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel", re_count=1
        )
        _clamp_posterize(train_tf)
    else:
        train_tf = eval_tf
    return train_tf, eval_tf, {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def _clamp_posterize(transform) -> None:
    """Keep timm's RandAugment working with Pillow >= 12.

    At magnitude 10 (reached by ``m9`` + ``mstd0.5`` in ~2 % of draws) timm's ``PosterizeIncreasing``
    asks for 0 bits; old Pillow returned a black image, Pillow >= 12 raises ``ValueError``. Clamp to
    1 bit (near-black), leaving every other op and level untouched.
    """
    from timm.data.auto_augment import RandAugment

    for t in getattr(transform, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if "Posterize" in op.name and op.level_fn is not None:
                    level_fn = op.level_fn
                    op.level_fn = lambda level, hparams, _f=level_fn: (max(1, _f(level, hparams)[0]),)


# ---------------------------------------------------------------------------------------------------
# uint8 batches: loader workers stop at the uint8 image, the device does the float arithmetic
#
# A 224 px float32 batch of 128 is 77 MB that workers write, the main process pins and the GPU copies;
# as uint8 it is 19 MB, and the per-image float passes (to float, / 255, normalise) leave the workers.
# The result is bit-identical to running timm's transform per image: the same PIL operations under the
# same seeded RNGs, then the same element-wise float32 operations in the same order.


class ErasedPatches:
    """Random-erasing rectangles of a batch: drawn in the loader workers, pasted on the device.

    ``boxes`` holds ``(sample, top, left, height, width, value shape)`` per rectangle (plain ints, so
    pasting needs no device → host copy) and ``values`` the concatenated fill values (float32).
    ``to`` / ``pin_memory`` let ``DataLoader(pin_memory=True)`` and accelerate move it like a tensor.
    """

    def __init__(self, boxes: List[Tuple[int, int, int, int, int, Tuple[int, ...]]], values: torch.Tensor) -> None:
        self.boxes, self.values = boxes, values

    def to(self, *args, **kwargs) -> ErasedPatches:
        return ErasedPatches(self.boxes, self.values.to(*args, **kwargs))

    def pin_memory(self, *args) -> ErasedPatches:
        return ErasedPatches(self.boxes, self.values.pin_memory(*args))

    def paste_(self, x: torch.Tensor) -> torch.Tensor:
        """Write every rectangle into the normalised batch ``x`` (in place) and return ``x``."""
        offset = 0
        for b, top, left, h, w, shape in self.boxes:
            k = math.prod(shape)
            x[b, :, top : top + h, left : left + w] = self.values[offset : offset + k].view(shape)
            offset += k
        return x


class _ErasingRecorder:
    """Stands in for the image tensor while timm's ``RandomErasing`` draws: records what it would write."""

    def __init__(self) -> None:
        self.writes: List[Tuple[int, int, int, int, torch.Tensor]] = []

    def __setitem__(self, key, value: torch.Tensor) -> None:
        _, rows, cols = key
        self.writes.append((rows.start, cols.start, rows.stop - rows.start, cols.stop - cols.start, value))


class Uint8Transform:
    """The PIL part of a timm transform, ending in a ``3 × H × W`` uint8 tensor (what ``to_tensor`` reads).

    Random erasing (if any) is drawn here, with the same RNG calls in the same order as timm's
    per-image transform, and returned as ``(top, left, h, w, values)`` writes for the device to apply.
    """

    def __init__(self, pil_ops: Any, erasing: Any = None) -> None:
        self.pil_ops, self.erasing = pil_ops, erasing

    def __call__(self, img):
        img = self.pil_ops(img)
        if getattr(img, "mode", None) != "RGB":
            raise ValueError(
                f"expected an RGB PIL image after the PIL transforms; got {img!r} (convert the dataset's images to RGB)"
            )
        w, h = img.size
        x = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(h, w, 3).permute(2, 0, 1).contiguous()
        writes: List[Tuple[int, int, int, int, torch.Tensor]] = []
        if self.erasing is not None:
            rec = _ErasingRecorder()
            self.erasing._erase(rec, 3, h, w, torch.float32)
            writes = rec.writes
        return x, writes

    def __repr__(self) -> str:
        return f"Uint8Transform(pil_ops={self.pil_ops!r}, erasing={self.erasing!r})"


class DeviceNormalize:
    """The float part of timm's transform on a uint8 batch: ``to_tensor``'s ``/ 255``, ``Normalize``, erasing."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        if (self.std == 0).any():
            raise ValueError(f"std must be non-zero; got {list(std)}")

    def __call__(self, x: torch.Tensor, patches: Optional[ErasedPatches] = None) -> torch.Tensor:
        if self.mean.device != x.device:
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        x = x.to(torch.float32).div(255).sub_(self.mean).div_(self.std)
        return patches.paste_(x) if patches is not None else x


def split_transform(transform: Any) -> Optional[Tuple[Uint8Transform, DeviceNormalize]]:
    """``(worker part, device part)`` of a timm transform, or ``None`` when it is not of the usual shape.

    The usual shape is ``Compose([PIL ops…, MaybeToTensor/ToTensor, Normalize[, RandomErasing]])``:
    what :func:`build_transforms` returns (train and eval). Apply the worker part per image (it returns
    ``(uint8 image, erasing writes)``), batch with :func:`collate_uint8`, and call the device part on the
    batch after moving it to the device: the result equals ``transform`` applied per image, bit for bit.
    """
    from timm.data.random_erasing import RandomErasing
    from torchvision import transforms as T

    ops = list(getattr(transform, "transforms", []))
    idx = [i for i, t in enumerate(ops) if type(t).__name__ in ("MaybeToTensor", "ToTensor")]
    if len(idx) != 1:
        return None
    tail = ops[idx[0] + 1 :]
    if not tail or not isinstance(tail[0], T.Normalize) or tail[0].inplace:
        return None
    erasing = None
    if len(tail) == 2 and isinstance(tail[1], RandomErasing) and str(tail[1].device) == "cpu":
        erasing = tail[1]
    elif len(tail) != 1:
        return None
    return Uint8Transform(T.Compose(ops[: idx[0]]), erasing), DeviceNormalize(tail[0].mean, tail[0].std)


def collate_uint8(batch) -> Tuple[torch.Tensor, torch.Tensor, ErasedPatches]:
    """Collate ``((uint8 image, erasing writes), label)`` items into ``(images, labels, ErasedPatches)``."""
    from torch.utils.data import default_collate

    images = default_collate([item[0][0] for item in batch])  # in a worker: stacked straight into shared memory
    labels = default_collate([item[1] for item in batch])
    boxes, values = [], []
    for b, item in enumerate(batch):
        for top, left, h, w, v in item[0][1]:
            boxes.append((b, top, left, h, w, tuple(v.shape)))
            values.append(v.reshape(-1))
    return images, labels, ErasedPatches(boxes, torch.cat(values) if values else torch.empty(0))


def device_batch(batch, device: torch.device, normalize: Optional[DeviceNormalize] = None):
    """``(x, y)`` on ``device`` from a loader batch: ``(x, y)``, or ``(uint8 x, y, patches)`` + ``normalize``."""
    batch = [t.to(device, non_blocking=True) for t in batch]
    if normalize is None:
        return batch[0], batch[1]
    return normalize(batch[0], batch[2]), batch[1]


def build_train_loader(
    train_set: Dataset,
    transform: Any,
    *,
    iterable: bool,
    batch_size: int,
    num_workers: int,
    seed: int,
    multiple_of: int,
    pin_memory: bool,
) -> Tuple[DataLoader, Optional[EpochSampler], Optional[DeviceNormalize]]:
    """``(loader, sampler, normalize)`` of a training run; pass batches through :func:`device_batch`.

    Map-style data gets an :class:`EpochSampler` and per-sample seeded augmentation
    (:class:`SeededTransform`); streamed data (``iterable``: hfids/, wds/) is sharded and shuffled by
    timm's reader (``sampler`` is ``None``; do not ``accelerator.prepare`` that loader). When the transform
    has timm's usual shape, workers return uint8 images and ``normalize`` does the float part on the
    device (:func:`split_transform`: bit-identical, a quarter of the bytes to pin and copy); otherwise
    ``normalize`` is ``None`` and batches are float. Workers persist across epochs.
    """
    kwargs: Dict[str, Any] = {
        "num_workers": num_workers,
        "pin_memory": pin_memory,
        "persistent_workers": num_workers > 0,
    }
    normalize = None
    split = split_transform(transform)
    if split is not None:
        transform, normalize = split
        kwargs["collate_fn"] = collate_uint8
    if iterable:
        train_set.transform = transform
        return DataLoader(train_set, batch_size=batch_size, drop_last=True, **kwargs), None, normalize
    sampler = EpochSampler(len(train_set), seed=seed, multiple_of=multiple_of)
    loader = DataLoader(
        SeededTransform(train_set, transform, seed),
        sampler=sampler,
        batch_size=batch_size,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
    return loader, sampler, normalize


def model_img_size(model: torch.nn.Module) -> int:
    size = getattr(model.patch_embed, "img_size", None)
    if isinstance(size, (tuple, list)):
        return int(size[0])
    return int(size or 224)


# ---------------------------------------------------------------------------------------------------
# checkpoints


TRAIN_STATE_NAME = "train_state.json"
# what accelerate.save_state writes next to the model/optimizer: RNG states (pickles of plain numbers
# and arrays, read back with weights_only=True). Any other *.pkl in a checkpoint was not written here.
_ACCELERATE_PICKLES = re.compile(r"random_states_\d+\.pkl")


class TrainState:
    """The loop position. Saved as ``train_state.json`` in each checkpoint (JSON, never a pickle)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> Dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.step = int(state["step"])


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or a checkpoint directory is not one this script can resume
    (the training scripts print its message, without a traceback, and exit 1)."""


def _write_failure(tmp: Path, e: BaseException) -> CheckpointError:
    shutil.rmtree(tmp, ignore_errors=True)
    err = getattr(e, "errno", None)
    full_words = ("No space left", "File too large", "Disk quota", "unexpected pos", "file write failed")
    if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or any(w in str(e) for w in full_words):
        why = "the disk (or your quota / file size limit) is full"
    elif err in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "the directory is not writable"
    else:
        why = "the write failed"
    free = ""
    try:
        free = f"; {shutil.disk_usage(tmp.parent).free / 1e6:.1f} MB free there"
    except OSError:
        pass
    return CheckpointError(
        f"could not write checkpoint {tmp.parent / tmp.name.replace('.tmp_', '')}: {why} "
        f"({type(e).__name__}: {e}){free}. The partial files were removed; earlier checkpoints are intact. "
        f"Free some space (or pass another --output-dir) and resume with --resume latest"
    )


def save_checkpoint(accelerator, output_dir: str, step: int, run_config: Dict[str, Any]) -> str:
    """``accelerator.save_state`` into ``OUTPUT_DIR/checkpoints/step_XXXXXXXX``, atomically.

    All processes write into a temporary folder, which the main process renames once everybody is
    done: a run killed while saving never leaves a half-written checkpoint that ``--resume latest``
    would pick. ``run_config.json`` records the flags that must match on resume, ``train_state.json``
    the step. A failed write (disk full, quota, permissions) removes the temporary folder and raises
    :class:`CheckpointError` naming the checkpoint.
    """
    root = Path(output_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(tmp / "run_config.json", run_config)
            write_json(tmp / TRAIN_STATE_NAME, {"step": int(step)})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except Exception as e:  # OSError, torch's RuntimeError, safetensors' SafetensorError
        raise _write_failure(tmp, e) from e
    accelerator.wait_for_everyone()
    return str(final)


def load_checkpoint(accelerator, path: str, state: TrainState) -> None:
    """Resume from checkpoint ``path`` without unpickling anything that could run code.

    The step comes from ``train_state.json``; model weights are safetensors; the optimizer, scheduler
    and RNG states go through ``accelerator.load_state`` with ``weights_only=True`` (tensors, numbers
    and arrays only). A ``*.pkl`` that accelerate's ``save_state`` did not write (e.g. a planted
    ``custom_checkpoint_0.pkl``, which accelerate would unpickle in full) is refused, as is any file
    that does not load under ``weights_only=True``: :class:`CheckpointError` naming the file.
    """
    from accelerate.utils import load as accelerate_load

    root = Path(path)
    foreign = sorted(f.name for f in root.iterdir() if f.suffix == ".pkl" and not _ACCELERATE_PICKLES.fullmatch(f.name))
    if foreign:
        raise CheckpointError(
            f"refusing to resume from {root}: it holds {', '.join(foreign)}, a pickle this script never "
            f"writes (it keeps the loop state in {TRAIN_STATE_NAME}); unpickling it could run arbitrary code. "
            f"Remove the file if you wrote it yourself, or resume from a checkpoint you trust"
        )
    if not (root / "model.safetensors").is_file():
        raise CheckpointError(
            f"cannot resume from {root}: model.safetensors is missing; not a complete checkpoint written by this script"
        )
    state_file = root / TRAIN_STATE_NAME
    try:
        saved = json.loads(state_file.read_text(encoding="utf-8"))
        step = saved["step"] if isinstance(saved, dict) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, RecursionError) as e:
        raise CheckpointError(
            f"cannot resume from {root}: {state_file.name} is missing or unreadable ({e}); "
            f"not a complete checkpoint written by this script"
        ) from None
    if not is_int(step) or step < 0:
        raise CheckpointError(f"cannot resume from {root}: {state_file} has step {step!r}; expected an int >= 0")
    named = re.fullmatch(r"step_(\d+)", root.name)
    if named and int(named.group(1)) != step:
        raise CheckpointError(
            f"cannot resume from {root}: {state_file.name} says step {step}, the folder name says "
            f"{int(named.group(1))}; the checkpoint was modified"
        )
    for f in sorted(root.glob("random_states_*.pkl")) + sorted(root.glob("*.bin")):
        try:  # what load_state will read, checked first under the same restriction
            accelerate_load(str(f), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"cannot resume from {root}: {f.name} does not load with weights_only=True ({first}); it holds "
                f"objects other than tensors and numbers, so it was modified or not written by this script"
            ) from None
    try:
        accelerator.load_state(str(root), load_kwargs={"weights_only": True})
    except Exception as e:  # missing / truncated files: FileNotFoundError, SafetensorError, RuntimeError, …
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"cannot resume from {root}: {type(e).__name__}: {first} — the checkpoint is "
            f"incomplete or was modified; resume from another one or start afresh"
        ) from e
    state.step = step


def find_checkpoint(output_dir: str, resume: Optional[str]) -> Optional[str]:
    """The checkpoint dir ``--resume`` names (``latest``: newest complete one, or ``None``)."""
    if resume is None:
        return None
    if resume != "latest":
        return resume
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    return str(done[-1]) if done else None


def check_resume_config(path: str, current: Dict[str, Any], must_match: Sequence[str]) -> None:
    """Raise if the checkpoint was written by a run whose ``must_match`` flags differ from now."""
    cfg_path = Path(path) / "run_config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} has no run_config.json: not a checkpoint written by this script")
    try:
        saved = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(
            f"{cfg_path} is unreadable ({type(e).__name__}: {e}); not a checkpoint written by this script"
        ) from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{cfg_path} is not a JSON object; not a checkpoint written by this script")
    diff = {k: (saved.get(k), current.get(k)) for k in must_match if saved.get(k) != current.get(k)}
    if diff:
        details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"cannot resume from {path}: the run was started with different settings "
            f"({details}); resume with the same flags, or start a fresh --output-dir"
        )


def sha256_file(path: Optional[str]) -> Optional[str]:
    if not path:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@torch.no_grad()
def evaluate_top1(accelerator, model: torch.nn.Module, loader) -> float:
    """Top-1 (%) of ``model`` over ``loader``, gathered across processes; the model's mode is kept."""
    was_training = model.training
    model.eval()
    correct = total = 0
    from tqdm.auto import tqdm

    for x, y in tqdm(
        loader, desc="validation", unit="batch", leave=False, disable=not accelerator.is_local_main_process
    ):
        with accelerator.autocast():
            pred = model(x).argmax(-1)
        pred, y = accelerator.gather_for_metrics((pred, y))
        correct += int((pred == y).sum())
        total += int(y.numel())
    model.train(was_training)
    return 100.0 * correct / max(total, 1)

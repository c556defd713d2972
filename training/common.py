"""The pieces the training scripts share, under the one name they had before they were split by concept.

Each lives in its own module; import from there in new code:

* :mod:`.seeds` — per-step seeds, scoped RNG states, the ``(m, n)`` pair draws;
* :mod:`.data` — datasets, timm transforms, the deterministic sampler and training loader;
* :mod:`.batches` — uint8 loader batches normalised on the device;
* :mod:`.args` — the shared command-line flags and their validation;
* :mod:`.backbone` — the embedded default backbone and ``--model`` / ``--checkpoint`` (via the
  package's model loader, :func:`tocom_hub.demo.models.load_model`);
* :mod:`.checkpoints` — atomic checkpoints and a resume that unpickles no code;
* :mod:`.metrics` — top-1 on a loader.

Imports are absolute (``tocom_hub.training.<module>``) so that ``python training/distill.py`` works as
well as ``python -m tocom_hub.training.distill`` and ``accelerate launch``.
"""

from __future__ import annotations

from tocom_hub.training.args import (
    add_accelerate_args,
    add_data_args,
    add_model_args,
    check_common_args,
    output_dir_problem,
    resolve_report_to,
    use_cpu,
)
from tocom_hub.training.backbone import (
    EMBEDDED_CHECKPOINT,
    EMBEDDED_DATA,
    EMBEDDED_DOWNSTREAM_DATA,
    EMBEDDED_MODEL,
    EMBEDDED_MODEL_KWARGS,
    EMBEDDED_R_MAX,
    build_backbone,
)
from tocom_hub.training.batches import (
    DeviceNormalize,
    ErasedPatches,
    Uint8Transform,
    collate_uint8,
    device_batch,
    split_transform,
)
from tocom_hub.training.checkpoints import (
    CheckpointError,
    TrainState,
    check_resume_config,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
    write_json,
)
from tocom_hub.training.data import (
    EpochSampler,
    InMemory,
    SeededTransform,
    build_datasets,
    build_train_loader,
    build_transforms,
    fits_in_memory,
)
from tocom_hub.training.metrics import evaluate_top1
from tocom_hub.training.seeds import derive_seed, heldout_pairs, sample_pair, seeded_rngs

__all__ = [
    "evaluate_top1",
    "EMBEDDED_MODEL",
    "EMBEDDED_MODEL_KWARGS",
    "EMBEDDED_DATA",
    "EMBEDDED_DOWNSTREAM_DATA",
    "EMBEDDED_CHECKPOINT",
    "EMBEDDED_R_MAX",
    "derive_seed",
    "seeded_rngs",
    "sample_pair",
    "heldout_pairs",
    "EpochSampler",
    "SeededTransform",
    "InMemory",
    "fits_in_memory",
    "add_model_args",
    "add_data_args",
    "add_accelerate_args",
    "check_common_args",
    "output_dir_problem",
    "build_backbone",
    "build_datasets",
    "build_transforms",
    "build_train_loader",
    "split_transform",
    "collate_uint8",
    "device_batch",
    "ErasedPatches",
    "Uint8Transform",
    "DeviceNormalize",
    "resolve_report_to",
    "use_cpu",
    "TrainState",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "find_checkpoint",
    "check_resume_config",
    "sha256_file",
    "write_json",
]

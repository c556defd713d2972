"""Checkpoints of a training run: atomic ``accelerator.save_state``, a resume that unpickles no code.

A checkpoint is ``OUTPUT_DIR/checkpoints/step_XXXXXXXX/`` as written by ``accelerator.save_state``
plus ``run_config.json`` (the flags that must match on resume) and ``train_state.json`` (the step).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from tocom_hub.core.checks import is_int
from tocom_hub.core.jsonio import write_json
from tocom_hub.tools.bank_fit import sha256_file as _sha256

__all__ = [
    "TrainState",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "find_checkpoint",
    "check_resume_config",
    "sha256_file",
]


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


# Not ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=...), measured with accelerate 1.15: it
# ignores save_state's output_dir (no write-then-rename), rotates *before* writing, and a write killed by a
# file-size limit left checkpoints/checkpoint_2/ empty, which load_state() then picked and failed on.
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
            write_json(tmp / "run_config.json", run_config, sort_keys=True)
            write_json(tmp / TRAIN_STATE_NAME, {"step": int(step)}, sort_keys=True)
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


def check_resume_config(
    path: str, current: Dict[str, Any], must_match: Sequence[str], flags: Optional[Mapping[str, str]] = None
) -> None:
    """Raise if the checkpoint was written by a run whose ``must_match`` recipe entries differ from now.

    The message names the command-line flag of each entry (``flags`` maps the entries that are not simply
    ``--<entry-with-dashes>``, e.g. ``global_batch_size`` → ``--batch-size``)."""
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
        names = dict(flags or {})
        details = "; ".join(
            f"{names.get(k, '--' + k.replace('_', '-'))}: {a!r} in the checkpoint's run, {b!r} now"
            for k, (a, b) in diff.items()
        )
        raise CheckpointError(
            f"cannot resume from {path}: {details}. These change the numbers: resume with the flags the run "
            f"started with, or start a fresh --output-dir"
        )


def sha256_file(path: Optional[str]) -> Optional[str]:
    """Hex SHA-256 of ``path`` (``None`` for no path): the ``checkpoint_sha256`` of recipes and banks."""
    return _sha256(path) if path else None

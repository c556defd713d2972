"""Run the training scripts as users do: subprocesses with this venv's python, tiny settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DISTILL = str(ROOT / "training" / "distill.py")
FINETUNE = str(ROOT / "training" / "finetune.py")
EVALUATE = str(ROOT / "training" / "evaluate.py")

# small and fast: 2 pairs, 64 held-out images, no workers
FAST = ["--heldout-pairs", "2", "--heldout-images", "64", "--num-workers", "0", "--log-every", "1"]


def script_env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def run(args, *, launcher=None, check=True, timeout=300):
    cmd = (launcher or [sys.executable]) + [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=script_env(), cwd=str(ROOT), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def load_bank_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "tocom.safetensors"))


def image_folder(root: Path, n_per_class: int = 12) -> Path:
    """A tiny ImageNet-layout folder (train/<class>/*.png) cut from the embedded photo crops."""
    from tocom_hub.demo.data import build_dataset

    ds = build_dataset("photo-crops", "train", 32, length=15 * n_per_class)
    for i in range(len(ds)):
        img, label = ds[i]
        if label < 2:
            d = root / "train" / f"class{label}"
            d.mkdir(parents=True, exist_ok=True)
            img.save(d / f"{i:04d}.png")
    return root

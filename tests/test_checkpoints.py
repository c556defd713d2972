"""Checkpoints (training/checkpoints.py) through training/distill.py: a resume never unpickles code from the
output directory, reads its step from JSON, refuses damaged checkpoints clearly; an unwritable output
directory is refused before training; a full disk during a checkpoint write is a clear error and leaves no
partial checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from training_helpers import DISTILL, FAST, ROOT, run, script_env


class _Payload:
    """Unpickling this creates the directory ``marker`` (what an attacker's code would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# distill.py at tiny settings, checkpointing at step 2 of 4: the resume tests' run
TINY_RESUMABLE_RUN = [
    "--max-steps",
    "4",
    "--checkpoint-every",
    "2",
    "--batch-size",
    "8",
    "--heldout-pairs",
    "0",
    "--num-workers",
    "0",
]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped after its checkpoint at step 2 (default data, tiny settings)."""
    out = tmp_path_factory.mktemp("stopped") / "out"
    run(
        [
            DISTILL,
            *TINY_RESUMABLE_RUN,
            "--stop-after",
            "2",
            "--output-dir",
            out,
        ]
    )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("planted", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"])
def test_resume_never_unpickles_code_from_the_output_dir(stopped_run, tmp_path, planted):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(stopped_run, out)
    ckpt = out / "checkpoints" / "step_00000002"
    assert ckpt.is_dir() and not list(ckpt.glob("custom_checkpoint_*.pkl"))  # the step is kept as JSON
    marker = tmp_path / "code-ran"
    torch.save({"step": 2, "state": _Payload(marker)}, ckpt / planted)
    proc = run(
        [
            DISTILL,
            *TINY_RESUMABLE_RUN,
            "--output-dir",
            out,
            "--resume",
            "latest",
        ],
        check=False,
    )
    assert not marker.exists(), f"resume executed code from {planted}"
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert planted in proc.stderr and "step_00000002" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "tocom.safetensors").exists()


@pytest.mark.slow
def test_resume_reads_the_step_from_json(stopped_run, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(stopped_run, out)
    state = json.loads((out / "checkpoints" / "step_00000002" / "train_state.json").read_text())
    assert state == {"step": 2}
    proc = run(
        [
            DISTILL,
            *TINY_RESUMABLE_RUN,
            "--output-dir",
            out,
            "--resume",
            "latest",
        ]
    )
    assert "at step 2" in proc.stderr
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] == 2


@pytest.mark.slow
def test_unwritable_output_dir_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for out in (blocker / "out", blocker):
        proc = run([DISTILL, "--max-steps", "30", "--batch-size", "16", "--output-dir", out, *FAST], check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"--output-dir {out}" in proc.stderr and "Traceback" not in proc.stderr
        assert "distill:" not in proc.stderr  # no training step ran
    if os.geteuid() != 0:  # root writes through permission bits
        ro = tmp_path / "read-only"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            proc = run([DISTILL, "--max-steps", "30", "--output-dir", ro / "out", *FAST], check=False)
            assert proc.returncode == 2 and "cannot write" in proc.stderr
        finally:
            ro.chmod(0o755)


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_write_is_clear_and_leaves_no_partial_folder(tmp_path):
    import resource

    out = tmp_path / "out"

    def small_files():  # every file this process writes is capped at 100 kB: writes beyond fail (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    cmd = [sys.executable, DISTILL, *TINY_RESUMABLE_RUN, "--output-dir", str(out)]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=script_env(),
        cwd=str(ROOT),
        timeout=300,
        preexec_fn=small_files,
        check=False,
    )
    assert proc.returncode != 0
    err = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert err and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "could not write checkpoint" in err[-1] and "step_00000002" in err[-1] and "full" in err[-1], err
    assert not list((out / "checkpoints").glob(".tmp_step_*")), list((out / "checkpoints").iterdir())
    assert not (out / "checkpoints" / "step_00000002").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, message",
    [
        ("no_model", "model.safetensors"),
        ("truncated_optimizer", "optimizer.bin"),
        ("step_edited", "train_state.json says step 99"),
        ("state_not_json", "train_state.json is missing or unreadable"),
        ("run_config_not_utf8", "run_config.json is unreadable"),
    ],
)
def test_damaged_checkpoint_is_a_clear_error(stopped_run, tmp_path, damage, message):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(stopped_run, out)
    ckpt = out / "checkpoints" / "step_00000002"
    if damage == "no_model":
        (ckpt / "model.safetensors").unlink()
    elif damage == "truncated_optimizer":
        data = (ckpt / "optimizer.bin").read_bytes()
        (ckpt / "optimizer.bin").write_bytes(data[: len(data) // 2])
    elif damage == "step_edited":
        (ckpt / "train_state.json").write_text('{"step": 99}')
    elif damage == "state_not_json":
        (ckpt / "train_state.json").write_text("{" * 10)
    else:
        (ckpt / "run_config.json").write_bytes(b"\xff\xfe\x00")
    proc = run(
        [
            DISTILL,
            *TINY_RESUMABLE_RUN,
            "--output-dir",
            out,
            "--resume",
            ckpt,
        ],
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and message in proc.stderr and str(ckpt) in proc.stderr, proc.stderr[-2000:]
    assert not (out / "tocom.safetensors").exists()

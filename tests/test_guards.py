"""One run per output dir, SIGTERM → a resumable checkpoint, flags checked on --resume, one-line errors for a
bad --model / --checkpoint, and every --help line with its default (training/guards.py, run.py, args.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from training_helpers import DISTILL, FINETUNE, ROOT, load_bank_tensors, run, script_env

from tocom_hub.core.jsonio import write_json
from tocom_hub.training import distill, evaluate, finetune
from tocom_hub.training import run as training_run
from tocom_hub.training.checkpoints import CheckpointError, check_resume_config
from tocom_hub.training.guards import LOCK_NAME, OutputDirBusy, RunGuard

FAST = ["--batch-size", "8", "--heldout-pairs", "0", "--num-workers", "0", "--no-augment", "--drop-path", "0"]


class _OneProcess:
    is_main_process, num_processes, device = True, 1, torch.device("cpu")


class _Started:
    """A training script in a subprocess; ``wait_for(text)`` blocks until its stderr shows ``text``."""

    def __init__(self, argv):
        cmd = [sys.executable, *map(str, argv)]
        self.proc = subprocess.Popen(
            cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=script_env(), cwd=str(ROOT)
        )
        self.err, self._seen = "", threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for line in self.proc.stderr:
            self.err += line

    def wait_for(self, text, timeout=120):
        t0 = time.time()
        while text not in self.err:
            if self.proc.poll() is not None or time.time() - t0 > timeout:
                raise AssertionError(f"never saw {text!r} (exit {self.proc.poll()}):\n{self.err[-3000:]}")
            time.sleep(0.05)

    def finish(self, timeout=120):
        rc = self.proc.wait(timeout)
        self._thread.join(5)
        return rc


def _snapshot(root: Path):
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
        for p in sorted(root.rglob("*"))
        if p.name != LOCK_NAME  # the lock file itself: opening it to try the lock is all a second run does
    }


# ---------------------------------------------------------------------------------------------------
# one run per output dir


def test_a_second_guard_on_a_locked_dir_refuses_in_one_line(tmp_path):
    first = RunGuard(str(tmp_path / "out"), "distill.py").lock(_OneProcess())
    try:
        with pytest.raises(OutputDirBusy) as e:
            RunGuard(str(tmp_path / "out"), "finetune.py").lock(_OneProcess())
        message = str(e.value)
        assert "\n" not in message and "in use by another run" in message
        assert f"pid {os.getpid()}" in message and "distill.py" in message
    finally:
        first.close()
    RunGuard(str(tmp_path / "out"), "finetune.py").lock(_OneProcess()).close()  # free again once released


@pytest.mark.slow
def test_two_runs_on_one_output_dir_the_second_refuses_and_touches_nothing(tmp_path):
    out = tmp_path / "out"
    first = _Started([DISTILL, *FAST, "--max-steps", "100000", "--output-dir", out])
    try:
        first.wait_for("bank: ")  # past the lock and the resume: the loop runs
        before = _snapshot(out)
        second = run([DISTILL, *FAST, "--max-steps", "3", "--seed", "1", "--output-dir", out], check=False)
        assert second.returncode == 1, second.stderr[-2000:]
        errors = [line for line in second.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "in use by another run" in errors[0] and "Traceback" not in second.stderr
        assert _snapshot(out) == before  # not a byte of the first run's output changed
        first.proc.send_signal(signal.SIGTERM)
        assert first.finish() == 143, first.err[-3000:]
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and (ckpts[0] / "model.safetensors").is_file()
    assert "SIGTERM: saved checkpoint" in first.err and not (out / "tocom.safetensors").exists()
    assert json.loads((ckpts[0] / "run_config.json").read_text())["seed"] == 0


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_ends_where_an_uninterrupted_run_does(tmp_path):
    flags = [*FAST, "--batch-size", "16", "--max-steps", "8", "--seed", "2"]
    run([DISTILL, *flags, "--output-dir", tmp_path / "full"])
    cut = _Started([DISTILL, *flags, "--output-dir", tmp_path / "cut"])
    cut.wait_for("bank: ")
    cut.proc.send_signal(signal.SIGTERM)
    assert cut.finish() == 143, cut.err[-3000:]
    (ckpt,) = sorted((tmp_path / "cut" / "checkpoints").glob("step_*"))
    stopped_at = json.loads((ckpt / "train_state.json").read_text())["step"]
    assert 1 <= stopped_at < 8 and not (tmp_path / "cut" / "tocom.safetensors").exists()
    resumed = run([DISTILL, *flags, "--output-dir", tmp_path / "cut", "--resume", "latest"])
    assert f"at step {stopped_at}" in resumed.stderr
    full, cut_bank = load_bank_tensors(tmp_path / "full"), load_bank_tensors(tmp_path / "cut")
    assert full.keys() == cut_bank.keys()
    for k in full:
        assert torch.equal(full[k], cut_bank[k]), k


# ---------------------------------------------------------------------------------------------------
# --resume checks every flag that changes the numbers


def test_resume_names_the_changed_flag(tmp_path):
    ckpt = tmp_path / "step_00000002"
    write_json(ckpt / "run_config.json", {"mixed_precision": "bf16", "global_batch_size": 8, "lr": 1e-3})
    now = {"mixed_precision": "no", "global_batch_size": 8, "lr": 1e-3}
    with pytest.raises(CheckpointError) as e:
        check_resume_config(str(ckpt), now, distill.RESUME_MUST_MATCH, training_run.RECIPE_FLAGS)
    message = str(e.value)
    assert "\n" not in message and "--mixed-precision: 'bf16' in the checkpoint's run, 'no' now" in message
    check_resume_config(str(ckpt), dict(now, mixed_precision="bf16"), distill.RESUME_MUST_MATCH)  # same: fine


@pytest.mark.parametrize("script", [distill, finetune], ids=["distill", "finetune"])
def test_every_flag_is_checked_on_resume_or_declared_harmless(script):
    unchecked = []
    for action in script.build_parser()._actions:
        if action.dest == "help":
            continue
        key = training_run.FLAG_TO_RECIPE.get(action.dest, action.dest)
        if key not in script.RESUME_MUST_MATCH and action.dest not in training_run.RESUME_MAY_CHANGE:
            unchecked.append(action.dest)
    assert not unchecked, f"flags neither checked on --resume nor listed in run.RESUME_MAY_CHANGE: {unchecked}"
    assert "mixed_precision" in script.RESUME_MUST_MATCH


# ---------------------------------------------------------------------------------------------------
# a bad --model / --checkpoint is one line


def test_build_backbone_turns_load_errors_into_one_line(tmp_path):
    from tocom_hub.training.backbone import BackboneError, build_backbone

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(64))
    base = dict(model_kwargs=None, img_size=None, pretrained=False, checkpoint=None, drop_path=0.0)
    bad_name = Namespace(**dict(base, model="no_such_vit"))
    bad_file = Namespace(**dict(base, model=None, checkpoint=str(garbage)))
    for ns in (bad_name, bad_file):
        with pytest.raises(BackboneError) as e:
            build_backbone(ns)
        assert "\n" not in str(e.value) and "cannot build the backbone" in str(e.value)


@pytest.mark.slow
def test_scripts_print_one_line_for_a_bad_model_or_checkpoint(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(100))
    cases = [
        ([DISTILL, "--model", "no_such_vit"], "distill: error: cannot build the backbone: unknown model 'no_such_vit'"),
        ([FINETUNE, "--checkpoint", garbage], "finetune: error: cannot build the backbone:"),
    ]
    for argv, message in cases:
        proc = run([*argv, "--max-steps", "1", "--output-dir", tmp_path / "out"], check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-500:]
    assert not (tmp_path / "out").exists()  # refused before anything was written


# ---------------------------------------------------------------------------------------------------
# --help shows every default


@pytest.mark.parametrize("script", [distill, finetune, evaluate], ids=["distill", "finetune", "evaluate"])
def test_every_help_line_shows_its_default(script, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    text = capsys.readouterr().out
    options = text[text.index("options:") :]
    blocks, current = [], None
    for line in options.splitlines():
        if line.startswith("  -"):
            current = [line]
            blocks.append(current)
        elif line.startswith("   ") and current is not None:
            current.append(line)
        else:
            current = None
    assert len(blocks) > 10
    missing = [b[0].split()[0] for b in blocks if "default" not in " ".join(b).lower() and "--help" not in b[0]]
    assert not missing, f"--help lines without their default: {missing}"

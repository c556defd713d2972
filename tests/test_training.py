"""The training scripts, run as users run them: subprocesses with this venv's python, tiny settings.

(a) the default distillation run produces metrics + a loadable bank, (b) two processes (torchrun,
gloo) take the same optimizer steps as one process with the doubled batch, (c) a run stopped after a
checkpoint and resumed ends with the same bank as an uninterrupted run, (d) finetune → evaluate,
(e) bad arguments exit non-zero with a clear message. Plus AdaptFormer against a hand-written
reference forward and the embedded datasets' determinism.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DISTILL = str(ROOT / "training" / "distill.py")
FINETUNE = str(ROOT / "training" / "finetune.py")
EVALUATE = str(ROOT / "training" / "evaluate.py")

# small and fast: 2 pairs, 64 held-out images, no workers
FAST = ["--heldout-pairs", "2", "--heldout-images", "64", "--num-workers", "0", "--log-every", "1"]


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def run(args, *, launcher=None, check=True, timeout=300):
    cmd = (launcher or [sys.executable]) + [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=str(ROOT), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def load_bank_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "tocom.safetensors"))


# ---------------------------------------------------------------------------------------------------
# (a) default short run


def test_default_distill_run_writes_metrics_and_bank(tmp_path):
    import tocom_hub

    out = tmp_path / "out"
    run([DISTILL, "--max-steps", "30", "--batch-size", "16", "--output-dir", out, *FAST])
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "heldout_kl_no_bank",
        "heldout_kl_with_bank",
        "heldout_pairs",
        "heldout_kl_no_bank_per_pair",
        "heldout_kl_with_bank_per_pair",
    ):
        assert key in metrics, key
    assert metrics["steps"] == 30 and metrics["direction"] == "inference"
    assert len(metrics["heldout_pairs"]) == 2 and all(m != n for m, n in metrics["heldout_pairs"])
    assert metrics["heldout_kl_no_bank"] > 0
    # 30 steps from a no-op bank on the embedded default: the bank must already help on held-out crops
    assert metrics["heldout_kl_with_bank"] < metrics["heldout_kl_no_bank"]

    bank = tocom_hub.ToComBank.from_pretrained(out)
    assert bank.r_max == 10 and bank.rank == 2 and bank.targets == ("q", "v")
    assert bank.config.training_recipe["direction"] == "inference"
    assert bank.config.training_recipe["total_steps"] == 30
    assert bank.config.eval_results["heldout_kl_with_bank"] == metrics["heldout_kl_with_bank"]
    assert any(a.abs().max() > 0 for a in bank.lora_B.values())  # it trained


# ---------------------------------------------------------------------------------------------------
# (b) two processes == one process with the doubled batch


def test_two_processes_equal_one_process_with_double_batch(tmp_path):
    common = ["--max-steps", "2", "--no-augment", "--drop-path", "0", "--heldout-pairs", "0", "--num-workers", "0"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run([DISTILL, *common, "--batch-size", "4", "--output-dir", tmp_path / "two"], launcher=torchrun)
    run([DISTILL, *common, "--batch-size", "8", "--output-dir", tmp_path / "one"])
    two, one = load_bank_tensors(tmp_path / "two"), load_bank_tensors(tmp_path / "one")
    assert two.keys() == one.keys()
    moved = 0.0
    for k in two:
        assert (two[k] - one[k]).abs().max().item() <= 1e-5, k
        if k.startswith("lora_B."):  # the up factors, zero at init
            moved = max(moved, two[k].abs().max().item())
    assert moved > 1e-4  # the steps did change the bank
    cfg = json.loads((tmp_path / "two" / "tocom_config.json").read_text())
    assert cfg["training_recipe"]["num_processes"] == 2 and cfg["training_recipe"]["global_batch_size"] == 8


# ---------------------------------------------------------------------------------------------------
# (c) stop after a checkpoint, resume → same bank as uninterrupted


def _image_folder(root: Path, n_per_class: int = 12) -> Path:
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


def test_resume_after_checkpoint_is_exact(tmp_path):
    # augmentation, mixup/cutmix and drop path all on: every random draw must be reproducible.
    # 24 images / batch 8 = 3 steps per epoch, so the stop (step 4) and the resume cross an epoch.
    data = _image_folder(tmp_path / "imgs")
    common = [
        "--data",
        data,
        "--max-steps",
        "5",
        "--checkpoint-every",
        "2",
        "--batch-size",
        "8",
        "--heldout-pairs",
        "0",
        "--num-workers",
        "1",
        "--seed",
        "3",
    ]
    run([DISTILL, *common, "--output-dir", tmp_path / "full"])
    stopped = run([DISTILL, *common, "--output-dir", tmp_path / "cut", "--stop-after", "4"])
    assert "stopping at step 4" in stopped.stderr
    assert (tmp_path / "cut" / "checkpoints" / "step_00000004").is_dir()
    assert not (tmp_path / "cut" / "tocom.safetensors").exists()
    resumed = run([DISTILL, *common, "--output-dir", tmp_path / "cut", "--resume", "latest"])
    assert "at step 4" in resumed.stderr
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["resumed_from_step"] == 4
    full, cut = load_bank_tensors(tmp_path / "full"), load_bank_tensors(tmp_path / "cut")
    for k in full:
        assert torch.equal(full[k], cut[k]), (k, (full[k] - cut[k]).abs().max().item())


# ---------------------------------------------------------------------------------------------------
# (d) finetune + evaluate


@pytest.mark.parametrize("mode", ["full", "adaptformer"])
def test_finetune_then_evaluate(tmp_path, mode):
    ft = tmp_path / f"ft-{mode}"
    run(
        [
            FINETUNE,
            "--mode",
            mode,
            "--source-r",
            "2",
            "--max-steps",
            "3",
            "--batch-size",
            "8",
            "--no-augment",
            "--val-images",
            "32",
            "--num-workers",
            "0",
            "--output-dir",
            ft,
        ]
    )
    recipe = json.loads((ft / "finetune.json").read_text())
    assert recipe["source_r"] == 2 and recipe["mode"] == mode and recipe["num_classes"] == 3
    assert 0.0 <= recipe["val_top1"] <= 100.0
    assert (ft / "model.safetensors").is_file()
    assert (ft / "adaptformer.safetensors").is_file() == (mode == "adaptformer")
    if mode == "full":
        return
    # a bank with non-zero up factors so that +ToCom differs from no ToCom
    import tocom_hub
    from tocom_hub.demo.models import load_model

    model = load_model(str(ft)).model
    bank = tocom_hub.ToComBank.for_model(model, r_max=4)
    with torch.no_grad():
        for a in bank.lora_B.values():
            a.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    bank.save_pretrained(tmp_path / "bank")
    ev = tmp_path / "eval"
    run(
        [
            EVALUATE,
            "--finetuned",
            ft,
            "--bank",
            tmp_path / "bank",
            "--scales",
            "0.1,1",
            "--val-images",
            "32",
            "--targets",
            "0,2,4",
            "--num-workers",
            "0",
            "--output-dir",
            ev,
        ]
    )
    result = json.loads((ev / "eval.json").read_text())
    assert result["source_r"] == 2 and result["targets"] == [0, 2, 4]
    assert set(result["tocom"]) == {"0.1", "1"}
    # at target == source the bank's update is zero: identical accuracy
    assert result["tocom"]["1"]["2"] == result["no_tocom"]["2"]
    assert (ev / "eval.png").stat().st_size > 1000


def test_in_memory_images_change_nothing(tmp_path):
    """--no-augment fine-tuning and evaluation keep decoded images in memory (--cache-mb): the same
    weights and accuracies as decoding every epoch / every target r."""
    from safetensors.torch import load_file

    outs = {}
    for cache in ("0", "1024"):
        ft = tmp_path / f"ft{cache}"
        run(
            [
                FINETUNE,
                "--mode",
                "adaptformer",
                "--max-steps",
                "4",
                "--batch-size",
                "8",
                "--no-augment",
                "--val-images",
                "16",
                "--num-workers",
                "0",
                "--cache-mb",
                cache,
                "--output-dir",
                ft,
            ]
        )
        ev = tmp_path / f"ev{cache}"
        run(
            [
                EVALUATE,
                "--finetuned",
                ft,
                "--val-images",
                "40",
                "--batch-size",
                "16",
                "--targets",
                "0,3",
                "--num-workers",
                "0",
                "--cache-mb",
                cache,
                "--output-dir",
                ev,
            ]
        )
        outs[cache] = (load_file(str(ft / "adaptformer.safetensors")), json.loads((ev / "eval.json").read_text()))
    (w0, e0), (w1, e1) = outs["0"], outs["1024"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert e0["no_tocom"] == e1["no_tocom"] and e0["images"] == e1["images"] == 40


def test_in_memory_dataset_reads_sampler_keys_modulo_length():
    from tocom_hub.training.common import InMemory

    data = [(torch.full((3, 2, 2), float(i)), i) for i in range(5)]
    cached = InMemory(data, batch_size=2)
    assert len(cached) == 5
    x, y = cached[7]  # EpochSampler key: epoch 1, index 2
    assert int(y) == 2 and torch.equal(x, data[2][0])


# ---------------------------------------------------------------------------------------------------
# (e) argument errors


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--r-max", "0"], "--r-max must be >= 1"),
        (["--targets", "q,x"], "--targets must be distinct names"),
        (["--batch-size", "7"], "--batch-size must be even"),
        (["--temperature", "0"], "--temperature must be > 0"),
        (["--checkpoint", "/nonexistent.safetensors"], "no such file"),
        (["--pretrained"], "--pretrained needs --model"),
        (["--data", "no-such-dataset"], "neither a directory"),
        (["--resume", "/nonexistent-dir"], "no such checkpoint directory"),
        (["--model-kwargs", "{depth: 3}"], "not valid JSON"),
        (["--kd", "features", "--cls-loss"], "cannot be combined"),
        (["--direction", "backwards"], "invalid choice"),
        (["--push-to-hub", "no-slash"], "org/name"),
    ],
)
def test_distill_argument_errors(argv, message, capsys):
    from tocom_hub.training import distill

    with pytest.raises(SystemExit) as exc:
        distill.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_argument_error_exits_nonzero_in_a_subprocess(tmp_path):
    proc = run([DISTILL, "--rank", "0", "--output-dir", tmp_path], check=False)
    assert proc.returncode == 2 and "--rank must be >= 1" in proc.stderr
    proc = run([FINETUNE, "--mode", "adaptformer", "--from-scratch", "--output-dir", tmp_path], check=False)
    assert proc.returncode == 2 and "needs pre-trained weights" in proc.stderr
    proc = run([EVALUATE, "--finetuned", tmp_path, "--output-dir", tmp_path], check=False)
    assert proc.returncode == 2 and "no finetune.json" in proc.stderr


def test_help_documents_the_direction_convention():
    proc = run([DISTILL, "--help"])
    assert "--direction" in proc.stdout and "paper-eq8" in proc.stdout and "inference" in proc.stdout


# ---------------------------------------------------------------------------------------------------
# in-process pieces


def test_adaptformer_matches_eq10_reference():
    """Eq. 10 by hand on an unpatched timm block vs the hooks, plain and with ToMe (r=0 ≡ timm)."""
    from timm.models.vision_transformer import VisionTransformer

    import tocom_hub
    from tocom_hub.demo.adaptformer import AdaptFormer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5).eval()
    adapters = AdaptFormer.for_model(model, bottleneck=4, scale=0.5)
    with torch.no_grad():
        for a in adapters.adapters:
            a.up.weight.normal_()
            a.up.bias.normal_()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t = model.patch_embed(x)
        t = model._pos_embed(t)
        for blk, ad in zip(model.blocks, adapters.adapters):
            t = t + blk.attn(blk.norm1(t))
            t = t + blk.mlp(blk.norm2(t)) + 0.5 * ad.up(torch.relu(ad.down(t)))
        ref = model.forward_head(model.norm(t))
        plain = model(x)
        adapters.attach(model)
        hooked = model(x)
        tocom_hub.patch(model)
        patched = model(x)
        tocom_hub.set_r(model, 3)
        merged = model(x)  # runs (token count changes inside the blocks)
        adapters.detach(model)
        tocom_hub.set_r(model, 0)
        back = model(x)
    assert (hooked - ref).abs().max() < 1e-5
    assert (patched - ref).abs().max() < 1e-5
    assert (hooked - plain).abs().max() > 1e-3 and merged.shape == ref.shape
    assert (back - plain).abs().max() < 1e-5


def test_embedded_datasets_are_deterministic_and_split():
    import numpy as np

    from tocom_hub.demo.data import build_dataset, list_datasets

    assert {"photo-crops", "photo-orientation"} <= set(list_datasets())
    a = build_dataset("photo-crops", "train", 16, length=20)
    b = build_dataset("photo-crops", "train", 16, length=20)
    v = build_dataset("photo-crops", "val", 16, length=20)
    for i in (0, 7, 19):
        assert np.array_equal(np.asarray(a[i][0]), np.asarray(b[i][0])) and a[i][1] == b[i][1]
        assert a[i][0].size == (16, 16) and a[i][0].mode == "RGB"
    assert not np.array_equal(np.asarray(a[3][0]), np.asarray(v[3][0]))
    assert sorted({a[i][1] for i in range(15)}) == list(range(15))
    with pytest.raises(KeyError, match="photo-crops"):
        build_dataset("nope")


def test_pair_sampling_is_uniform_and_stable():
    from collections import Counter

    from tocom_hub.training.common import heldout_pairs, sample_pair

    assert sample_pair(0, 123, 10) == sample_pair(0, 123, 10)
    counts = Counter(sample_pair(0, s, 3) for s in range(6000))
    assert set(counts) == {(m, n) for m in range(4) for n in range(4) if m != n}
    assert min(counts.values()) > 0.7 * 6000 / 12
    pairs = heldout_pairs(0, 10, 8)
    assert len(set(pairs)) == 8 and all(m != n for m, n in pairs) and pairs == heldout_pairs(0, 10, 8)


# ---------------------------------------------------------------------------------------------------
# (f) faults: planted pickles, unwritable output dirs, a full disk


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


def test_disk_full_during_a_checkpoint_write_is_clear_and_leaves_no_partial_folder(tmp_path):
    import resource

    out = tmp_path / "out"

    def small_files():  # every file this process writes is capped at 100 kB: writes beyond fail (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    cmd = [
        sys.executable,
        DISTILL,
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
        "--output-dir",
        str(out),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=_env(), cwd=str(ROOT), timeout=300, preexec_fn=small_files, check=False
    )
    assert proc.returncode != 0
    err = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert err and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "could not write checkpoint" in err[-1] and "step_00000002" in err[-1] and "full" in err[-1], err
    assert not list((out / "checkpoints").glob(".tmp_step_*")), list((out / "checkpoints").iterdir())
    assert not (out / "checkpoints" / "step_00000002").exists()


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

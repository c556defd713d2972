"""training/distill.py run as users run it: (a) the default run writes metrics and a loadable bank, (b) two
processes (torchrun, gloo) take the same optimizer steps as one process with the doubled batch, (c) a run
stopped after a checkpoint and resumed ends with the same bank as an uninterrupted run, (d) bad arguments
exit non-zero with a clear message."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from training_helpers import DISTILL, EVALUATE, FAST, FINETUNE, ROOT, image_folder, load_bank_tensors, run

# ---------------------------------------------------------------------------------------------------
# (a) default short run


@pytest.mark.slow
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

    # the card save_pretrained wrote beside it: no Hub base_model (the embedded 96-dim backbone is none), and its
    # snippet builds the embedded backbone and applies the bank
    from hub_helpers import run_card_snippet

    card = (out / "README.md").read_text()
    assert "base_model" not in card.split("---")[1] and "timm/vit_tiny" not in card
    assert tocom_hub.get_r(run_card_snippet(card, str(out), str(out))) == bank.r_max


# ---------------------------------------------------------------------------------------------------
# (b) two processes == one process with the doubled batch


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_after_checkpoint_is_exact(tmp_path):
    # augmentation, mixup/cutmix and drop path all on: every random draw must be reproducible.
    # 24 images / batch 8 = 3 steps per epoch, so the stop (step 4) and the resume cross an epoch.
    data = image_folder(tmp_path / "imgs")
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
        (["--kd", "tokens", "--cls-loss"], "cannot be combined with --kd tokens"),
        (["--direction", "paper-eq8"], "unrecognized arguments"),  # an ablation of the study now
        (["--push-to-hub", "no-slash"], "org/name"),
    ],
)
def test_distill_argument_errors(argv, message, capsys):
    from tocom_hub.training import distill

    with pytest.raises(SystemExit) as exc:
        distill.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_argument_error_exits_nonzero_in_a_subprocess(tmp_path):
    proc = run([DISTILL, "--rank", "0", "--output-dir", tmp_path], check=False)
    assert proc.returncode == 2 and "--rank must be >= 1" in proc.stderr
    proc = run([FINETUNE, "--mode", "adaptformer", "--from-scratch", "--output-dir", tmp_path], check=False)
    assert proc.returncode == 2 and "needs pre-trained weights" in proc.stderr
    proc = run([EVALUATE, "--finetuned", tmp_path, "--output-dir", tmp_path], check=False)
    assert proc.returncode == 2 and "no finetune.json" in proc.stderr


def test_paper_eq8_is_a_study_ablation_with_swapped_roles():
    sys.path.insert(0, str(ROOT / "benchmarks" / "study"))
    import eq8

    from tocom_hub.training.distiller import Distiller

    assert Distiller.direction == "inference" and Distiller.roles(None, 2, 5) == (2, 5)
    assert eq8.PaperEq8Distiller.direction == "paper-eq8" and eq8.PaperEq8Distiller.roles(None, 2, 5) == (5, 2)


@pytest.mark.slow
def test_the_eq8_ablation_trains_through_the_product_trainer(tmp_path):
    flags = ["--max-steps", "2", "--batch-size", "8", "--no-augment", "--num-workers", "0", "--heldout-pairs", "1"]
    run([ROOT / "benchmarks" / "study" / "eq8.py", *flags, "--heldout-images", "16", "--output-dir", tmp_path])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["direction"] == "paper-eq8" and metrics["heldout_direction"] == "paper-eq8"
    cfg = json.loads((tmp_path / "tocom_config.json").read_text())
    assert cfg["training_recipe"]["direction"] == "paper-eq8"


# ---------------------------------------------------------------------------------------------------
# (e) dense mode: teacher and student keep every patch; the bank records the mode


@pytest.mark.slow
def test_dense_distill_run_records_the_mode_and_is_refused_on_a_regular_model(tmp_path):
    import tocom_hub
    import tocom_hub.demo  # noqa: F401 (registers the "demo" alias)
    from tocom_hub.tools.models import load_model

    out = tmp_path / "dense"
    argv = ["--max-steps", "12", "--batch-size", "8", "--r-max", "4", "--dense", "--dense-ratio", "8"]
    run([DISTILL, *argv, "--output-dir", out, *FAST])
    metrics = json.loads((out / "metrics.json").read_text())
    bank = tocom_hub.ToComBank.from_pretrained(out)
    assert (bank.dense, bank.dense_ratio, bank.r_max) == (True, 8, 4)
    assert bank.config.training_recipe["dense"] is True and bank.config.training_recipe["dense_ratio"] == 8
    assert any(a.abs().max() > 0 for a in bank.lora_B.values())  # it trained
    assert metrics["heldout_kl_no_bank"] > 0
    model = load_model("demo").model
    tocom_hub.patch(model)
    with pytest.raises(ValueError, match="regular mode but the bank was trained in dense"):
        tocom_hub.apply(model, 0, 4, bank=bank)
    tocom_hub.unpatch(model)
    tocom_hub.apply(model, 0, 4, bank=bank)  # an unpatched model is patched in the bank's mode
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.forward_features(x).shape == load_model("demo").model.forward_features(x).shape

"""training/finetune.py run as users run it, then training/evaluate.py on its output."""

from __future__ import annotations

import json

import pytest
import torch
from training_helpers import EVALUATE, FINETUNE, run


@pytest.mark.slow
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
    assert (ft / "model.safetensors").is_file() and (ft / "config.json").is_file()  # timm's save_for_hf layout
    assert (ft / "adaptformer.safetensors").is_file() == (mode == "adaptformer")
    if mode == "full":
        return
    # a bank with non-zero up factors so that +ToCom differs from no ToCom
    import tocom_hub
    from tocom_hub.tools.models import load_model

    model, info = load_model(str(ft))
    assert info["recipe"]["source_r"] == 2 and "adaptformer" in info
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
            "--save-correct",
        ]
    )
    result = json.loads((ev / "eval.json").read_text())
    assert result["source_r"] == 2 and result["targets"] == [0, 2, 4]
    from safetensors.torch import load_file

    hits = load_file(str(ev / "correct.safetensors"))  # per image: the paired bootstrap's input
    assert len(hits) == 3 * 3 and all(v.shape == (result["images"],) for v in hits.values())
    for t in (0, 2, 4):  # they give exactly the accuracies of eval.json
        assert 100.0 * int(hits[f"no_tocom.r{t}"].sum()) / result["images"] == result["no_tocom"][str(t)]
        assert 100.0 * int(hits[f"tocom.s1.r{t}"].sum()) / result["images"] == result["tocom"]["1"][str(t)]
    assert set(result["tocom"]) == {"0.1", "1"}
    # at target == source the bank's update is zero: identical accuracy
    assert result["tocom"]["1"]["2"] == result["no_tocom"]["2"]
    assert (ev / "eval.png").stat().st_size > 1000


@pytest.mark.slow
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

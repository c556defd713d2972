"""One embedded world: a bank made for another backbone warns (architecture, pretrained tag, backbone weights),
the CLI loads the quickstart's own models, and ``tocom-hub eval`` warns on random weights
(tocom_hub/tools/bank_fit.py, tocom_hub/demo/study_models.py, tocom_hub/cli)."""

from __future__ import annotations

import warnings

import pytest
import torch
from tool_helpers import KW, NAME, run, tiny_model

import tocom_hub.demo  # noqa: F401 -- registers the demo and study aliases
from tocom_hub import ToComBank
from tocom_hub.demo import demo_bank_path, load_demo_model
from tocom_hub.tools.bank_fit import backbone_mismatch, model_lineage
from tocom_hub.tools.evaluation import evaluate
from tocom_hub.tools.models import MODEL_ALIASES, load_model

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _loader(model, n=4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, 3, 64, 64, generator=g), torch.arange(n) % 3)]


def test_architecture_and_tag_mismatches_are_named_and_a_matching_bank_is_quiet():
    model = tiny_model()
    assert backbone_mismatch(ToComBank.for_model(model, r_max=4), model) is None
    other_arch = ToComBank.for_model(model, r_max=4, base_model="deit_tiny_patch16_224", pretrained_tag=None)
    assert "trained for deit_tiny_patch16_224 but the model is a vit_tiny_patch16_224" in backbone_mismatch(
        other_arch, model
    )
    tagged = ToComBank.for_model(model, r_max=4, pretrained_tag="augreg_in21k")
    assert "pretrained tag is 'augreg_in21k_ft_in1k'" in backbone_mismatch(tagged, model)
    hub_name = ToComBank.for_model(model, r_max=4, base_model=f"timm/{NAME}.augreg_in21k_ft_in1k")
    assert backbone_mismatch(hub_name, model) is None  # the same backbone, spelled as a Hub id


def test_same_architecture_other_weights_is_noticed_through_the_lineage(tmp_path):
    model = tiny_model()
    bank = ToComBank.for_model(model, r_max=4, pretrained_tag=None)
    bank.config.training_recipe = {"checkpoint_sha256": "a" * 64, "weights": "file:model.safetensors"}
    assert backbone_mismatch(bank, model) is None  # without the lineage: unknown, not a mismatch
    assert "other backbone weights" in backbone_mismatch(bank, model, {"sha256:" + "b" * 64})
    assert backbone_mismatch(bank, model, {"sha256:" + "b" * 64, "sha256:" + "a" * 64}) is None  # fine-tuned from it


def test_evaluate_warns_when_the_bank_is_for_another_backbone():
    model = tiny_model()
    bank = ToComBank.for_model(model, r_max=4, pretrained_tag="augreg_in21k")  # (another architecture: apply refuses)
    with pytest.warns(UserWarning, match="pretrained tag is 'augreg_in21k_ft_in1k'"):
        evaluate(model, _loader(model), [0, 2], bank=bank, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        evaluate(model, _loader(model), [0, 2], bank=ToComBank.for_model(model, r_max=4), progress=False)


def test_the_demo_backbone_and_the_study_bank_are_told_apart():
    bank = ToComBank.from_pretrained(demo_bank_path())
    demo, info = load_model("demo")
    message = backbone_mismatch(bank, demo, model_lineage(demo, info))
    assert message and "other backbone weights" in message
    for name in ("study-backbone", "study-shape-count-src0", "study-shape-count-src16-seed1"):
        model, info = load_model(name)
        assert backbone_mismatch(bank, model, model_lineage(model, info)) is None, name
    assert "study-backbone" in MODEL_ALIASES["demo"].description  # the name says which one the bank is for


def test_the_cli_loads_the_quickstarts_adaptformer_models():
    x = torch.randn(2, 3, 32, 32)
    for name, r, seed in [("study-shape-count-src0", 0, 0), ("study-shape-count-src16-seed1", 16, 1)]:
        model, info = load_model(name)
        assert info["source_r"] == r and info["method"] == "tome"
        with torch.no_grad():
            assert torch.equal(model(x), load_demo_model(r, seed=seed).model(x)), name
    with pytest.raises(ValueError, match="loaded as shipped"):
        load_model("study-shape-count-src0", model_kwargs={"depth": 2})


def test_eval_warns_on_the_mismatched_demo_pair_and_not_on_the_matched_one(capsys):
    common = ["--limit", "4", "--batch-size", "4", "--target-r", "0,4", "--workers", "0", "--bank", demo_bank_path()]
    code, out, err = run(["eval", "--model", "demo", "--data", "photo-crops", *common], capsys)
    assert code == 0, err
    assert "tocom-hub eval: warning: the bank was trained on other backbone weights" in err
    code, out, err = run(["eval", "--model", "study-shape-count-src16", "--data", "shape-count", *common], capsys)
    assert code == 0, err
    assert "warning" not in err.lower() and "source r=16" in out


def test_eval_warns_on_random_weights(tmp_path, capsys):
    from tool_helpers import make_files

    files = make_files(tmp_path)
    argv = ["eval", "--model", NAME, "--model-kwargs", KW, "--data", files / "data", "--limit", "2", "--workers", "0"]
    code, out, err = run([*argv, "--target-r", "0"], capsys)
    assert code == 0, err
    assert "RANDOM weights" in err

"""The model loader :func:`tocom_hub.tools.models.load_model`: saved timm directories, timm's save_for_hf layout
written by training/export.py (adapters and recipe included) and the shipped demo weights give the logits of the
model that was saved."""

from __future__ import annotations

import json

import pytest
import torch
from tool_helpers import NAME, TINY, tiny_model

from tocom_hub.demo.models import DEMO_WEIGHTS
from tocom_hub.tools.adaptformer import AdaptFormer
from tocom_hub.tools.models import load_model
from tocom_hub.training.export import save_finetuned

pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.py: one torch thread for the module


def test_load_model_saved_directories(files, tmp_path):
    from safetensors.torch import save_file

    reference = tiny_model()
    x = torch.randn(2, 3, 64, 64)
    model, info = load_model(str(files / "model"))
    assert info["model"] == NAME and torch.allclose(model(x), reference(x), atol=1e-6)
    # weights with a results finetune.json but no timm config.json: not a model directory
    ft = tmp_path / "ft"
    ft.mkdir()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, ft / "model.safetensors")
    kwargs = {k: v for k, v in TINY.items() if k != "num_classes"}
    (ft / "finetune.json").write_text(
        json.dumps({"model": NAME, "model_kwargs": kwargs, "num_classes": 3, "method": "evit", "source_r": 2})
    )
    for folder in (ft, tmp_path):
        with pytest.raises(FileNotFoundError, match="not a saved model directory"):
            load_model(str(folder))


# ---------------------------------------------------------------------------------------------------
# fine-tuned models: timm's save_for_hf layout (training/export.py)

KWARGS = dict(img_size=32, patch_size=4, depth=2, embed_dim=64, num_heads=2)
RECIPE = {"model": NAME, "model_kwargs": KWARGS, "num_classes": 5, "method": "evit", "source_r": 3, "data": "x"}


def _finetuned(mode: str):
    """A tiny fine-tuned model (random, non-zero adapters in PET mode) and its adapters."""
    import timm

    import tocom_hub

    torch.manual_seed(0)
    model = timm.create_model(NAME, num_classes=5, **KWARGS).eval()
    with torch.no_grad():
        model.head.weight.normal_()  # timm zero-initialises the head
    tocom_hub.patch(model, method="evit", prop_attn=True)
    adapters = None
    if mode == "adaptformer":
        adapters = AdaptFormer.for_model(model, bottleneck=4, scale=0.5)
        with torch.no_grad():
            for p in adapters.parameters():
                p.normal_()  # `up` starts at zero: make the adapters change the output
        adapters.attach(model)
    recipe = dict(RECIPE, mode=mode, adapter_bottleneck=4, adapter_scale=0.5)
    return model, adapters, recipe


@pytest.mark.parametrize("mode", ["full", "adaptformer"])
def test_finetuned_output_reloads_as_the_saved_model(tmp_path, mode):
    import timm

    model, adapters, recipe = _finetuned(mode)
    x = torch.randn(3, 3, 32, 32)
    save_finetuned(model, str(tmp_path), recipe, adapters=adapters)
    assert not (tmp_path / "finetune.json").exists()  # the loader needs only timm's layout

    loaded, info = load_model(str(tmp_path))
    import tocom_hub

    tocom_hub.patch(loaded, method="evit", prop_attn=True)  # the loader returns the plain timm model
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert (info["method"], info["source_r"], info["recipe"]["mode"]) == ("evit", 3, mode)
    assert info["recipe"]["format_version"] == 2 and info["recipe"]["data"] == "x"
    assert ("adaptformer" in info) == (mode == "adaptformer")

    # timm alone reads the layout: the backbone without the adapters
    plain = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    if adapters is not None:
        adapters.detach(model)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))


def test_adapters_missing_from_a_saved_adaptformer_model_is_an_error(tmp_path):
    model, adapters, recipe = _finetuned("adaptformer")
    save_finetuned(model, str(tmp_path), recipe, adapters=adapters)
    (tmp_path / "adaptformer.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adaptformer.safetensors is missing"):
        load_model(str(tmp_path))


def test_half_precision_weights_load_into_a_float32_model(tmp_path):
    model, _, recipe = _finetuned("full")
    save_finetuned(model, str(tmp_path), recipe, dtype=torch.float16)
    loaded = load_model(str(tmp_path)).model
    sd = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, sd[k].half().float()), k


@pytest.mark.skipif(not DEMO_WEIGHTS.is_file(), reason="this install lacks the demo weights")
def test_the_shipped_weights_file_describes_itself():
    """The demo weights carry their recipe in the file's metadata: the file alone loads the demo model."""
    by_file, info = load_model(str(DEMO_WEIGHTS))
    by_alias = load_model("demo").model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(by_file(x), by_alias(x))
    assert info["recipe"]["model"] == NAME and info["method"] == "tome"

"""Agreement with the published reference ToMe (numbers in ../shared/testdata, no code)."""

import json
from pathlib import Path

import pytest
import timm
import torch

import tocom_hub

DATA = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "tome_reference.safetensors"
pytestmark = pytest.mark.skipif(not DATA.exists(), reason=f"reference test vectors not found at {DATA}")


@pytest.fixture(scope="module")
def reference():
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(DATA), "pt") as f:
        meta = f.metadata()
    return load_file(str(DATA)), json.loads(meta["models"]), json.loads(meta["timm_kwargs"])


@pytest.mark.parametrize("tag", ["deit", "deitdist", "vit"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_logits_and_sources_match_reference_tome(reference, tag, fused):
    tensors, models, kwargs = reference
    model = timm.create_model(models[tag], pretrained=False, **kwargs).eval()
    prefix = f"{tag}.model."
    model.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    x = tensors["x"]
    checked = 0
    for r in (0, 1, 2, 4, 8):
        for prop in (0, 1):
            tocom_hub.patch(model, prop_attn=bool(prop), trace_source=True)
            tocom_hub.set_r(model, r)
            with torch.no_grad():
                out = model(x)
            assert (out - tensors[f"{tag}.logits.r{r}.prop{prop}"]).abs().max() <= 1e-5, (r, prop)
            if prop:
                ref_src = tensors[f"{tag}.source.r{r}"]
                src = tocom_hub.get_source(model)
                if ref_src.numel() == 0:
                    assert src is None
                else:
                    assert torch.equal(src, ref_src), r
            checked += 1
    assert checked == 10

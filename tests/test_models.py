"""The model loader :func:`tocom_hub.demo.models.load_model`: saved timm directories and finetune.py outputs give
the logits of the model that was saved."""

from __future__ import annotations

import json

import pytest
import torch
from tool_helpers import NAME, TINY, make_files, tiny_model

from tocom_hub.demo.models import load_model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread avoids OpenMP hand-offs that dominate on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny model (timm's config.json + model.safetensors), a bank, an ImageFolder, an image."""
    return make_files(tmp_path_factory.mktemp("tools"))


def test_load_model_saved_directories(files, tmp_path):
    from safetensors.torch import save_file

    reference = tiny_model()
    x = torch.randn(2, 3, 64, 64)
    model, info = load_model(str(files / "model"))
    assert info["model"] == NAME and torch.allclose(model(x), reference(x), atol=1e-6)
    # a training/finetune.py output directory
    ft = tmp_path / "ft"
    ft.mkdir()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, ft / "model.safetensors")
    kwargs = {k: v for k, v in TINY.items() if k != "num_classes"}
    (ft / "finetune.json").write_text(
        json.dumps({"model": NAME, "model_kwargs": kwargs, "num_classes": 3, "method": "evit", "source_r": 2})
    )
    model, info = load_model(str(ft))
    assert (info["method"], info["source_r"]) == ("evit", 2) and torch.allclose(model(x), reference(x), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="not a saved model directory"):
        load_model(str(tmp_path))

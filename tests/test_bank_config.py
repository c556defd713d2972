"""ToComConfig (core/bank/config.py): field validation, the JSON file, the format versions it reads."""

from __future__ import annotations

import json

import pytest
from tiny_models import make_timm

from tocom_hub import ToComConfig
from tocom_hub.core.bank.config import CONFIG_NAME, FORMAT_VERSION, FORMAT_VERSIONS, model_dims


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(targets=("q", "x")), "targets"),
        (dict(targets=("q", "q")), "targets"),
        (dict(targets="qv"), "targets"),
        (dict(method="dynamicvit"), "method"),
        (dict(rank=0), "rank"),
        (dict(r_max=True), "r_max"),
        (dict(scale=float("nan")), "scale"),
        (dict(format_version=FORMAT_VERSION + 1), "newer"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ToComConfig(embed_dim=64, depth=2, num_heads=2, **kwargs)


def test_config_json_round_trip(tmp_path):
    cfg = ToComConfig(
        embed_dim=64,
        depth=2,
        num_heads=2,
        targets=("q", "v", "proj"),
        base_model="vit_x",
        training_recipe={"epochs": 10, "lr": 1e-3},
        eval_results={"vtab": {"0->16": 69.9}},
    )
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert data["targets"] == ["q", "v", "proj"] and data["training_recipe"]["epochs"] == 10
    assert ToComConfig.from_json_file(tmp_path / CONFIG_NAME) == cfg
    with pytest.warns(UserWarning, match="unknown"):
        assert ToComConfig.from_dict(dict(data, future_field=1)) == cfg


def test_format_versions_read_and_refused():
    assert FORMAT_VERSION == 2 and FORMAT_VERSIONS == (2,)
    assert ToComConfig(embed_dim=64, depth=2, num_heads=2, format_version=2).format_version == 2
    for bad, match in (
        (3, "newer than this tocom-hub supports .2.; upgrade"),
        (0, "unknown"),
        ("2", "unknown"),
        (1, "unknown"),
    ):
        with pytest.raises(ValueError, match=match):
            ToComConfig(embed_dim=64, depth=2, num_heads=2, format_version=bad)


def test_model_dims_reads_the_blocks():
    model = make_timm("vit_tiny_patch16_224")
    assert model_dims(model) == {"embed_dim": 64, "attn_dim": 64, "depth": 3, "num_heads": 2}
    with pytest.raises(TypeError, match="Linear: not a model of a supported family"):
        model_dims(model.head)

"""Uploading a bank (hub/push.py: push_bank, which is ToComBank.push_to_hub of core/bank.py): the files, the model
card, a new branch, no write access."""

from __future__ import annotations

import pytest
from hub_helpers import R_MAX, RANK, TIMM_NAME, assert_same_bank, make_bank, n_params, tiny_vit
from huggingface_hub import ModelCard
from huggingface_hub.errors import RepositoryNotFoundError

from tocom_hub import ToComBank
from tocom_hub.hub import BankHubError, push_bank


def test_push_then_pull_round_trip(hub_server, tmp_path):
    model = tiny_vit()
    recipe = {"dataset": "imagenet-1k", "epochs": 10, "lr": 0.001}
    evals = {"VTAB-1k, source 0 -> target 16": {"ToMe": 67.9, "ToMe + ToCom": 69.9}}
    bank = make_bank(model, training_recipe=recipe, eval_results=evals)
    commit = bank.push_to_hub("org/pushed", token=hub_server.token)
    assert "org/pushed" in commit.commit_url

    files = hub_server.files("org/pushed")
    assert set(files) == {"tocom.safetensors", "tocom_config.json", "README.md"}
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "tocom-hub"
    assert card.data.base_model == f"timm/{TIMM_NAME}"
    assert card.data.pipeline_tag == "image-classification"
    assert card.data.license == "apache-2.0"  # the backbone's weights license, as timm reports it
    assert {"tocom", "token-merging", "tome", "timm", "vision-transformer"} <= set(card.data.tags)
    assert card.data.datasets == ["imagenet-1k"]
    size = len(files["tocom.safetensors"])
    for fact in (
        f"| r range | 0 … {R_MAX} ",
        f"| LoRA rank | {RANK} |",
        "| targets | q, v |",
        f"| parameters | {n_params():,} |",
        f"({size:,} bytes",
        'bank="org/pushed"',
        "| epochs | 10 |",
        "| 67.9 | 69.9 |",
        "arXiv",
        "2408.06798",
    ):
        assert fact in card.text, fact

    cache = tmp_path / "cache"
    assert_same_bank(ToComBank.from_pretrained("org/pushed", cache_dir=cache), bank)

    # no write access: a clear error, huggingface_hub's as the cause
    hub_server.add_repo("org/locked", private=True)
    with pytest.raises(BankHubError, match="'org/locked'.*write token") as info:
        push_bank(bank, "org/locked")
    assert isinstance(info.value.__cause__, RepositoryNotFoundError)

    # a second push to a new branch leaves main alone
    bank2 = make_bank(model, seed=7)
    push_bank(bank2, "org/pushed", revision="dev", token=hub_server.token, commit_message="dev bank")
    assert hub_server.files("org/pushed")["tocom.safetensors"] == files["tocom.safetensors"]
    assert_same_bank(ToComBank.from_pretrained("org/pushed", revision="dev", cache_dir=cache), bank2)

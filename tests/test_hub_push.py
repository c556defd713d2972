"""Uploading a bank (hub/push.py: push_bank): the files, the model card, a new branch, a dry run without requests,
no write access, a rejected token, an unreachable Hub, offline mode: each failure one line with its reason."""

from __future__ import annotations

import pytest
from hub_helpers import R_MAX, RANK, assert_same_bank, make_bank, n_params, tiny_vit
from huggingface_hub import ModelCard
from huggingface_hub.errors import RepositoryNotFoundError

import tocom_hub
from tocom_hub.hub import BankHubError, push_bank


def test_push_then_pull_round_trip(hub_server, tmp_path):
    model = tiny_vit()
    recipe = {"dataset": "imagenet-1k", "epochs": 10, "lr": 0.001}
    evals = {"VTAB-1k, source 0 -> target 16": {"ToMe": 67.9, "ToMe + ToCom": 69.9}}
    bank = make_bank(model, training_recipe=recipe, eval_results=evals)
    commit = push_bank(bank, "org/pushed", token=hub_server.token)
    assert "org/pushed" in commit.commit_url

    files = hub_server.files("org/pushed")
    assert set(files) == {"tocom.safetensors", "tocom_config.json", "README.md"}
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "tocom-hub"
    assert card.data.base_model is None  # a 64-dim backbone is not timm's 192-dim vit_tiny: no claim
    assert card.data.pipeline_tag == "image-classification"
    assert card.data.license == "apache-2.0"
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
    assert_same_bank(tocom_hub.load_bank("org/pushed", cache_dir=cache), bank)

    # no write access: a clear error, huggingface_hub's as the cause
    hub_server.add_repo("org/locked", private=True)
    with pytest.raises(BankHubError, match="'org/locked'.*write token") as info:
        push_bank(bank, "org/locked")
    assert isinstance(info.value.__cause__, RepositoryNotFoundError)

    # a second push to a new branch leaves main alone
    bank2 = make_bank(model, seed=7)
    push_bank(bank2, "org/pushed", revision="dev", token=hub_server.token, commit_message="dev bank")
    assert hub_server.files("org/pushed")["tocom.safetensors"] == files["tocom.safetensors"]
    assert_same_bank(tocom_hub.load_bank("org/pushed", revision="dev", cache_dir=cache), bank2)


def test_dry_run_makes_no_request_and_shows_what_would_go(hub_server, tmp_path):
    bank = make_bank(tiny_vit())
    hub_server.clear_requests()
    plan = push_bank(bank, "org/dry", dry_run=True)
    assert hub_server.requests == [] and not hub_server.has_repo("org/dry")
    assert set(plan["files"]) == {"tocom.safetensors", "tocom_config.json", "README.md"}
    assert all(size > 0 for size in plan["files"].values())
    assert 'bank="org/dry"' in plan["card"] and plan["revision"] == "main"


def test_push_errors_are_one_line_with_the_reason(hub_server, hub_client, tmp_path):
    bank = make_bank(tiny_vit())
    hub_server.reject_tokens = True  # the Hub answers 401 to any token but its own
    with pytest.raises(BankHubError) as info:
        push_bank(bank, "org/x", token="hf_wrong")
    text = str(info.value)
    assert "\n" not in text and "HTTP 401" in text and "rejected the token" in text, text
    hub_server.reject_tokens = False

    hub_server.stop()  # unreachable
    with pytest.raises(BankHubError) as info:
        push_bank(bank, "org/x", token=hub_server.token)
    text = str(info.value)
    assert "\n" not in text and "could not be reached" in text and "'org/x'" in text, text
    hub_server.start()

    bank.save_pretrained(tmp_path / "b")
    code = f"import tocom_hub; tocom_hub.hub.push_bank(tocom_hub.load_bank({str(tmp_path / 'b')!r}), 'org/x')"
    out = hub_client.run(code, offline=True)
    assert out.raised("BankHubError") and "offline mode is on" in out.error_message, out.error_message
    assert not hub_server.has_repo("org/x")

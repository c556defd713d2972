"""ToCom banks on the Hub: tocom_hub.hub, the registry and the ``tocom-hub`` CLI against the test Hub.

The real huggingface_hub client talks HTTP to ``tests/hub_server.py`` (``HF_ENDPOINT`` is set in
conftest.py); nothing in huggingface_hub is patched. Online calls run in-process with a per-test
``cache_dir``; offline mode and the console script run in subprocesses (``hub_client``).
Expected values come from independent sources: the files we committed, a naive per-group loop for
the merged weights, the closed-form parameter count, ``os.path.getsize``.
"""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import (
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

import tocom_hub
from tocom_hub import ToComBank, cli
from tocom_hub.hub import (
    REGISTRY_ENV,
    BankHubError,
    BankNotFoundError,
    NoBankForModelError,
    create_model_card,
    download_bank,
    push_bank,
    registered_banks,
)

ROOT = Path(__file__).resolve().parents[1]
TIMM_NAME = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # timm's default tag for the architecture
R_MAX, RANK = 4, 2


# ---------------------------------------------------------------------------------------------------
# helpers


def tiny_vit(embed_dim: int = 64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, embed_dim=embed_dim, num_heads=2
    ).eval()


def make_bank(model: torch.nn.Module, seed: int = 0, **config) -> ToComBank:
    """A bank with random, non-zero factors (a fresh bank is a no-op: its up factors are zero)."""
    bank = ToComBank.for_model(model, r_max=R_MAX, rank=RANK, **config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return bank


def bank_files(bank: ToComBank, tmp_path: Path, name: str = "bank") -> dict:
    out = tmp_path / name
    bank.save_pretrained(out)
    return {f: (out / f).read_bytes() for f in ("tocom.safetensors", "tocom_config.json")}


def assert_same_bank(a: ToComBank, b: ToComBank) -> None:
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def expected_qkv(model: torch.nn.Module, bank: ToComBank, m: int, n: int) -> list:
    """Naive reference for W' = W + s Σ_{i=m}^{n-1} A_i B_i on the q and v rows (one group at a time)."""
    out = []
    for b, blk in enumerate(model.blocks):
        w = blk.attn.qkv.weight.detach().double().clone()
        d = w.shape[1]
        for t, row in (("q", 0), ("v", 2 * d)):
            for i in range(m, n):
                a_i = bank.A[t][b][:, i * RANK : (i + 1) * RANK].double()
                b_i = bank.B[t][b][i * RANK : (i + 1) * RANK].double()
                w[row : row + d] += bank.config.scale * (a_i @ b_i)
        out.append(w)
    return out


def n_params(embed_dim: int = 64, depth: int = 2, targets: int = 2) -> int:
    return R_MAX * depth * targets * RANK * (embed_dim + embed_dim)


@pytest.fixture
def bank_repo(hub_server, tmp_path):
    """``org/bank`` on the test Hub holding a bank for ``tiny_vit()``; returns (bank, files, commit sha)."""
    bank = make_bank(tiny_vit())
    files = bank_files(bank, tmp_path)
    sha = hub_server.commit("org/bank", files)
    return bank, files, sha


def _unregister_all() -> None:
    for name, entries in registered_banks().items():
        if any(e.source == "register_bank" for e in entries):
            tocom_hub.unregister_bank(name)


@pytest.fixture
def clean_registry(monkeypatch):
    """No in-process registrations and no $TOCOM_HUB_REGISTRY, before and after the test."""
    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    _unregister_all()
    yield
    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    _unregister_all()


# ---------------------------------------------------------------------------------------------------
# download, cache, revisions, offline


def test_first_download_then_cache_with_server_stopped(hub_server, bank_repo, tmp_path):
    bank, files, sha = bank_repo
    cache = tmp_path / "cache"
    folder = download_bank("org/bank", cache_dir=cache)
    assert Path(folder).name == sha
    assert {f: (Path(folder) / f).read_bytes() for f in files} == files
    assert_same_bank(ToComBank.from_pretrained(folder), bank)

    hub_server.clear_requests()  # unchanged etag: HEAD only, nothing downloaded again
    assert download_bank("org/bank", cache_dir=cache) == folder
    assert all(method == "HEAD" for method, _ in hub_server.requests)

    hub_server.stop()
    assert download_bank("org/bank", cache_dir=cache) == folder
    assert_same_bank(ToComBank.from_pretrained("org/bank", cache_dir=cache), bank)


def test_revision_pinning_and_etag_refresh(hub_server, tmp_path):
    model = tiny_vit()
    bank1, bank2 = make_bank(model, seed=1), make_bank(model, seed=2)
    sha1 = hub_server.commit("org/bank", bank_files(bank1, tmp_path, "b1"))
    hub_server.tag("org/bank", "v1")
    cache = tmp_path / "cache"
    assert Path(download_bank("org/bank", cache_dir=cache)).name == sha1

    sha2 = hub_server.commit("org/bank", bank_files(bank2, tmp_path, "b2"))
    main = download_bank("org/bank", cache_dir=cache)  # main moved: the new commit is fetched
    assert Path(main).name == sha2
    assert_same_bank(ToComBank.from_pretrained(main), bank2)
    for rev in ("v1", sha1):
        pinned = download_bank("org/bank", revision=rev, cache_dir=cache)
        assert Path(pinned).name == sha1
        assert_same_bank(ToComBank.from_pretrained("org/bank", revision=rev, cache_dir=cache), bank1)


def test_config_file_is_optional(hub_server, tmp_path):
    bank = make_bank(tiny_vit())
    files = bank_files(bank, tmp_path)
    hub_server.commit("org/weights-only", {"tocom.safetensors": files["tocom.safetensors"]})
    folder = download_bank("org/weights-only", cache_dir=tmp_path / "cache")
    assert sorted(os.listdir(folder)) == ["tocom.safetensors"]
    assert_same_bank(ToComBank.from_pretrained(folder), bank)  # config embedded in the weights


def test_offline_mode_subprocess(hub_server, hub_client, bank_repo):
    bank, _, sha = bank_repo
    download_bank("org/bank", cache_dir=hub_client.cache_dir)  # fill the subprocess's cache
    hub_server.clear_requests()
    code = f"""
import tocom_hub
from tocom_hub.hub import BankNotFoundError
bank = tocom_hub.ToComBank.from_pretrained("org/bank")
pinned = tocom_hub.ToComBank.from_pretrained("org/bank", revision="{sha}")
result = {{"sums": [float(sum(p.double().sum() for p in b.parameters())) for b in (bank, pinned)]}}
try:
    tocom_hub.ToComBank.from_pretrained("org/never-downloaded")
except BankNotFoundError as e:
    result["error"], result["cause"] = str(e), type(e.__cause__).__name__
"""
    out = hub_client.run(code, offline=True).unwrap()
    expected = float(sum(p.detach().double().sum() for p in bank.parameters()))
    assert out["sums"] == pytest.approx([expected, expected], rel=1e-12)
    assert out["cause"] == "LocalEntryNotFoundError"
    for part in ("org/never-downloaded", "tocom.safetensors", "'main'", "HF_HUB_OFFLINE=1", "tocom-hub download"):
        assert part in out["error"]
    assert hub_server.requests == []  # offline: not a single request


def test_missing_repo_file_revision_and_empty_cache(hub_server, bank_repo, tmp_path):
    hub_server.tag("org/bank", "v1")
    hub_server.commit("org/not-a-bank", {"README.md": "hello"})
    cache = tmp_path / "cache"
    cases = [
        (dict(repo_id="org/missing"), RepositoryNotFoundError, ["'org/missing'", "not found", "token="]),
        (
            dict(repo_id="org/not-a-bank"),
            RemoteEntryNotFoundError,
            ["'org/not-a-bank'", "no tocom.safetensors", "'main'", "push_to_hub"],
        ),
        (
            dict(repo_id="org/bank", revision="v9"),
            RevisionNotFoundError,
            ["'v9'", "'org/bank'", "branches: main", "tags: v1"],
        ),
        (
            dict(repo_id="org/bank", local_files_only=True),
            LocalEntryNotFoundError,
            ["'org/bank'", "tocom.safetensors", "not in the cache", "local_files_only=True"],
        ),
    ]
    for kwargs, cause, parts in cases:
        with pytest.raises(BankNotFoundError) as info:
            download_bank(cache_dir=cache, **kwargs)
        err = info.value
        assert isinstance(err, FileNotFoundError) and isinstance(err.__cause__, cause), kwargs
        assert err.repo_id == kwargs["repo_id"]
        for part in parts:
            assert part in str(err), (part, str(err))
    # a private repo needs a token; the message says so
    hub_server.add_repo("org/private", private=True)
    hub_server.commit(
        "org/private",
        {"tocom.safetensors": (Path(download_bank("org/bank", cache_dir=cache)) / "tocom.safetensors").read_bytes()},
    )
    with pytest.raises(BankNotFoundError, match="private and no valid token"):
        download_bank("org/private", cache_dir=cache)
    assert Path(download_bank("org/private", cache_dir=cache, token=hub_server.token), "tocom.safetensors").is_file()

    # the same errors reach ToComBank.from_pretrained and tocom_hub.apply (model untouched)
    with pytest.raises(BankNotFoundError, match="org/missing"):
        ToComBank.from_pretrained("org/missing", cache_dir=cache)
    model = tiny_vit()
    before = state_hash(model)
    with pytest.raises(BankNotFoundError, match="'v9'"):
        tocom_hub.apply(model, source_r=0, target_r=R_MAX, bank="org/bank", revision="v9", cache_dir=cache)
    assert state_hash(model) == before and not tocom_hub.is_patched(model)


def test_invalid_bank_file_on_hub_names_the_repo(hub_server, tmp_path):
    hub_server.commit("org/garbage", {"tocom.safetensors": os.urandom(256)})  # intact download, not a bank
    model = tiny_vit()
    before = state_hash(model)
    with pytest.raises(ValueError, match="'org/garbage'.*not a readable safetensors file"):
        tocom_hub.apply(model, source_r=0, target_r=R_MAX, bank="org/garbage", cache_dir=tmp_path / "cache")
    assert state_hash(model) == before and not tocom_hub.is_patched(model)


@pytest.mark.parametrize("kind", ["truncated", "tampered"])
def test_corrupt_download_is_a_clear_error_and_model_untouched(hub_server, bank_repo, tmp_path, kind):
    bank, files, _ = bank_repo
    weights = files["tocom.safetensors"]
    if kind == "truncated":
        served, expected = weights[:-64], "incomplete or corrupted"
    else:  # same length, flipped bytes in the tensor data: only a content hash can tell
        bad = bytearray(weights)
        bad[-8:] = bytes(b ^ 0xFF for b in bad[-8:])
        served, expected = bytes(bad), "is corrupted: its SHA-256"
    hub_server.corrupt("org/bank", "tocom.safetensors", served)
    cache = tmp_path / "cache"
    with pytest.raises(BankHubError, match=expected) as info:
        download_bank("org/bank", cache_dir=cache)
    assert "'org/bank'" in str(info.value) and "tocom.safetensors" in str(info.value)

    model = tiny_vit()
    before = state_hash(model)
    with pytest.raises(BankHubError, match=expected):
        tocom_hub.apply(model, source_r=0, target_r=R_MAX, bank="org/bank", cache_dir=cache)
    assert state_hash(model) == before and not tocom_hub.is_patched(model)

    hub_server.clear_corruption()  # nothing bad stayed in the cache: the next call gets the real file
    assert_same_bank(ToComBank.from_pretrained("org/bank", cache_dir=cache), bank)


# ---------------------------------------------------------------------------------------------------
# push / model card


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


def test_model_card_without_optional_facts():
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)  # no pretrained tag
    bank = ToComBank.for_model(model, r_max=3, method="evit")
    card = create_model_card(bank)
    assert card.data.library_name == "tocom-hub" and card.data.base_model is None
    assert {"evit", "token-pruning"} <= set(card.data.tags) and "token-merging" not in card.data.tags
    assert "None" not in card.text and "{{" not in card.text and "{%" not in card.text
    assert "recorded no training recipe" in card.text and "No evaluation results" in card.text
    assert "| r range | 0 … 3 " in card.text


def test_model_card_template_is_shipped_and_in_sync():
    assert (ROOT / "MODEL_CARD.md").read_text() == (ROOT / "tocom_hub" / "MODEL_CARD.md").read_text()
    assert "MODEL_CARD.md" in (ROOT / "setup.cfg").read_text().split("[options.package_data]")[1].split("[")[0]


# ---------------------------------------------------------------------------------------------------
# tocom_hub.apply with Hub ids and the registry


def test_apply_from_hub_then_from_cache_with_server_down(hub_server, bank_repo, tmp_path):
    bank, _, _ = bank_repo
    cache = tmp_path / "cache"
    model = tiny_vit()
    want = expected_qkv(model, bank, 0, R_MAX)
    tocom_hub.apply(model, source_r=0, target_r=R_MAX, bank="org/bank", cache_dir=cache)
    assert tocom_hub.is_patched(model) and tocom_hub.get_r(model) == R_MAX
    for blk, w in zip(model.blocks, want):
        torch.testing.assert_close(blk.attn.qkv.weight.double(), w, rtol=1e-6, atol=1e-6)

    hub_server.stop()
    again = tiny_vit()
    tocom_hub.apply(again, source_r=0, target_r=R_MAX, bank="org/bank", cache_dir=cache)
    assert state_hash(again) == state_hash(model)
    with torch.inference_mode():
        again(torch.randn(2, 3, 64, 64))


def test_wrong_model_bank_from_hub_leaves_model_unchanged(hub_server, tmp_path):
    small = make_bank(tiny_vit(embed_dim=32))
    hub_server.commit("org/bank-32", bank_files(small, tmp_path))
    model = tiny_vit(embed_dim=64)
    before = state_hash(model)
    with pytest.raises(ValueError, match="embed_dim 32.*has 64"):
        tocom_hub.apply(model, source_r=0, target_r=R_MAX, bank="org/bank-32", cache_dir=tmp_path / "cache")
    assert state_hash(model) == before and not tocom_hub.is_patched(model)


def test_bank_none_resolves_through_registry(hub_server, tmp_path, clean_registry, monkeypatch):
    model = tiny_vit()
    bank_v1, bank_main = make_bank(model, seed=1), make_bank(model, seed=2)
    hub_server.commit("org/reg", bank_files(bank_v1, tmp_path, "b1"))
    hub_server.tag("org/reg", "v1")
    hub_server.commit("org/reg", bank_files(bank_main, tmp_path, "b2"))
    cache = tmp_path / "cache"
    assert TIMM_NAME not in registered_banks()  # the packaged registry parses (and has no such bank)

    entry = tocom_hub.register_bank(TIMM_NAME, "org/reg", revision="v1")
    assert registered_banks()[TIMM_NAME][0] == entry
    want = expected_qkv(model, bank_v1, 0, R_MAX)
    tocom_hub.apply(model, source_r=0, target_r=R_MAX, cache_dir=cache)
    for blk, w in zip(model.blocks, want):
        torch.testing.assert_close(blk.attn.qkv.weight.double(), w, rtol=1e-6, atol=1e-6)

    # a user registry file ($TOCOM_HUB_REGISTRY) keyed by the bare architecture
    tocom_hub.unregister_bank(TIMM_NAME)
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"banks": {"vit_tiny_patch16_224": {"repo_id": "org/reg", "method": "tome"}}}))
    monkeypatch.setenv(REGISTRY_ENV, str(registry))
    other = tiny_vit()
    want = expected_qkv(other, bank_main, 0, R_MAX)
    tocom_hub.apply(other, source_r=0, target_r=R_MAX, cache_dir=cache)
    for blk, w in zip(other.blocks, want):
        torch.testing.assert_close(blk.attn.qkv.weight.double(), w, rtol=1e-6, atol=1e-6)

    # no bank for this model: the error lists the known ones and shows bank=
    monkeypatch.delenv(REGISTRY_ENV)
    tocom_hub.register_bank("deit_base_patch16_224.fb_in1k", "org/deit-bank")
    fresh = tiny_vit()
    before = state_hash(fresh)
    with pytest.raises(NoBankForModelError) as info:
        tocom_hub.apply(fresh, source_r=0, target_r=R_MAX)
    msg = str(info.value)
    for part in (
        TIMM_NAME,
        "deit_base_patch16_224.fb_in1k → org/deit-bank (tome)",
        'bank="org/name"',
        "register_bank(",
    ):
        assert part in msg, part
    assert state_hash(fresh) == before and not tocom_hub.is_patched(fresh)


# ---------------------------------------------------------------------------------------------------
# CLI


def test_cli_console_script_info(hub_server, hub_client, bank_repo):
    _, files, sha = bank_repo
    exe = shutil.which("tocom-hub", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "tocom_hub"]
    proc = subprocess.run(cmd + ["info", "org/bank"], env=hub_client.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip() for line in proc.stdout.splitlines()}
    assert lines["r range"].startswith(f"0-{R_MAX}")
    assert lines["rank"] == str(RANK)
    assert lines["targets"] == "q, v"
    assert lines["parameters"] == f"{n_params():,}"
    assert lines["size on disk"].endswith(f"({len(files['tocom.safetensors']):,} bytes)")
    assert lines["base model"] == TIMM_NAME and lines["method"] == "tome"
    assert sha[:12] in lines["bank"]


def test_cli_in_process(hub_server, bank_repo, tmp_path, capsys):
    bank, files, sha = bank_repo
    cache = str(tmp_path / "cache")
    assert cli.main(["download", "org/bank", "--cache-dir", cache]) == 0
    folder = capsys.readouterr().out.strip()
    assert Path(folder).name == sha and (Path(folder) / "tocom.safetensors").read_bytes() == files["tocom.safetensors"]

    assert cli.main(["info", folder, "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["r_max"] == R_MAX and facts["rank"] == RANK and facts["targets"] == ["q", "v"]
    assert facts["num_parameters"] == n_params() and facts["size_bytes"] == len(files["tocom.safetensors"])

    assert (
        cli.main(["push", folder, "org/cli-pushed", "--commit-message", "from the CLI", "--token", hub_server.token])
        == 0
    )
    assert "org/cli-pushed" in capsys.readouterr().out
    assert set(hub_server.files("org/cli-pushed")) == {"tocom.safetensors", "tocom_config.json", "README.md"}
    assert_same_bank(ToComBank.from_pretrained("org/cli-pushed", cache_dir=cache), bank)

    # errors: one line on stderr, exit status 1, no traceback unless --debug
    for argv in (["info", "org/missing", "--cache-dir", cache], ["push", str(tmp_path / "nope"), "org/x"]):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"tocom-hub {argv[0]}: error: ")
        assert "Traceback" not in err
    with pytest.raises(BankNotFoundError):
        cli.main(["info", "org/missing", "--cache-dir", cache, "--debug"])


def test_python_dash_m_entry_point(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["tocom_hub", "--version"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("tocom_hub", run_name="__main__")
    assert info.value.code == 0 and tocom_hub.__version__ in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# malformed registry files


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\xff\xfe{\x00}\x00", "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested"),
        (json.dumps({"banks": {TIMM_NAME: {"repo_id": "org/reg", "revision": 5}}}).encode(), r"revision 5 \(int\)"),
        (json.dumps({"banks": {TIMM_NAME: {"repo_id": "org/reg", "method": ["tome"]}}}).encode(), "method"),
        (json.dumps({"banks": {TIMM_NAME: {"repo_id": 7}}}).encode(), "repo_id"),
        (json.dumps({"banks": []}).encode(), "'banks' must map"),
    ],
)
def test_malformed_registry_file_is_named_and_does_not_hide_register_bank(
    tmp_path, clean_registry, monkeypatch, content, match
):
    from tocom_hub.hub import resolve_bank

    registry = tmp_path / "my-registry.json"
    registry.write_bytes(content)
    monkeypatch.setenv(REGISTRY_ENV, str(registry))
    model = tiny_vit()
    with pytest.raises(ValueError, match=match) as info:
        registered_banks()
    assert str(registry) in str(info.value) and REGISTRY_ENV in str(info.value)
    with pytest.raises(ValueError, match=match):
        resolve_bank(model)  # nothing registered in-process: the file is needed and is broken
    entry = tocom_hub.register_bank(TIMM_NAME, "org/mine", revision="v2")
    assert resolve_bank(model) == entry  # a valid in-process entry is not blocked by the file


def test_register_bank_validates_the_revision(clean_registry):
    for bad in (5, "", ["v1"]):
        with pytest.raises(ValueError, match="revision must be"):
            tocom_hub.register_bank(TIMM_NAME, "org/reg", revision=bad)
    assert TIMM_NAME not in registered_banks()

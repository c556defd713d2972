"""The public Hub namespace (tocom_hub.hub): tocom_hub.apply with Hub ids, the ``tocom-hub`` CLI against the test Hub,
and the layering (the core imports nothing from tocom_hub.hub).
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_helpers import (
    R_MAX,
    RANK,
    TIMM_NAME,
    assert_same_bank,
    bank_files,
    commit_bank_repo,
    expected_qkv,
    make_bank,
    n_params,
    state_hash,
    tiny_vit,
)
from import_graph import GRAPH, MODULES, circles

import tocom_hub
from tocom_hub import cli
from tocom_hub.hub import BankNotFoundError

# ---------------------------------------------------------------------------------------------------
# tocom_hub.apply with Hub ids and the registry


@pytest.fixture
def bank_repo(hub_server, tmp_path):
    return commit_bank_repo(hub_server, tmp_path)


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

    hub_server.clear_requests()  # --dry-run: the card and the files, no request
    assert cli.main(["push", folder, "org/cli-dry", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert hub_server.requests == [] and not hub_server.has_repo("org/cli-dry")
    assert "would upload to org/cli-dry" in out and "--- README.md ---" in out and 'bank="org/cli-dry"' in out
    for name in ("tocom.safetensors", "tocom_config.json", "README.md"):
        assert f"  {name}  " in out

    assert (
        cli.main(["push", folder, "org/cli-pushed", "--commit-message", "from the CLI", "--token", hub_server.token])
        == 0
    )
    assert "org/cli-pushed" in capsys.readouterr().out
    assert set(hub_server.files("org/cli-pushed")) == {"tocom.safetensors", "tocom_config.json", "README.md"}
    assert_same_bank(tocom_hub.load_bank("org/cli-pushed", cache_dir=cache), bank)

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
# layering


def _identifiers(path: Path) -> set:
    """Every name the code of ``path`` uses (names, attributes, imported names; not strings or docstrings)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {a.name.rsplit(".", 1)[-1] for a in node.names}
    return names


# huggingface_hub calls that make requests
_NETWORK_CALLS = {
    "hf_hub_download",
    "snapshot_download",
    "HfApi",
    "get_hf_file_metadata",
    "http_get",
    "list_repo_refs",
    "create_repo",
    "create_branch",
    "upload_folder",
    "create_commit",
    "model_info",
    "repo_info",
    "ModelHubMixin",
    "ModelCard",
}


def test_the_core_imports_nothing_from_the_hub_namespace():
    core = [name for name in GRAPH if name.startswith("tocom_hub.core.")]
    assert len(core) > 5
    for name in core:
        bad = {n for n in GRAPH[name] if n == "tocom_hub.hub" or n.startswith("tocom_hub.hub.")}
        assert not bad, (name, bad)
    assert "tocom_hub.hub.load" in GRAPH["tocom_hub.cli.options"]  # the scan sees relative imports
    assert "tocom_hub.core.bank.registry" in GRAPH["tocom_hub.hub"]


def test_no_core_module_calls_the_network():
    """No module of the core names a huggingface_hub call that makes a request, nor imports huggingface_hub at all
    (tests/test_hub_imports.py checks the same at run time); the hub layer is where they are."""
    import ast

    for name in [n for n in MODULES if n == "tocom_hub.core" or n.startswith("tocom_hub.core.")]:
        found = _identifiers(MODULES[name]) & _NETWORK_CALLS
        assert not found, (name, found)
        for node in ast.walk(ast.parse(MODULES[name].read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not [m for m in mods if m.split(".")[0] == "huggingface_hub"], (name, mods)
    assert {"get_hf_file_metadata", "http_get"} <= _identifiers(MODULES["tocom_hub.hub.fetch"])  # the scan sees them
    assert "HfApi" in _identifiers(MODULES["tocom_hub.hub.push"])


def test_one_path_or_repo_rule():
    """``is_local_bank`` is the only place that tells a path from a repo id."""
    import re

    rule = re.compile(r"count\(\"/\"\) > 1")
    owners = [n for n, p in MODULES.items() if rule.search(p.read_text())]
    assert owners == ["tocom_hub.hub.load"], owners
    from tocom_hub.hub import is_local_bank

    for local in ("./bank", "/abs/bank", "~/bank", "a/b/c", "bank.safetensors", "C:\\banks\\b"):
        assert is_local_bank(local), local
    assert is_local_bank(Path("org/name"))  # a Path is always a path
    for repo in ("org/name", "name"):
        assert not is_local_bank(repo), repo


def test_no_import_circle_in_core_and_hub():
    names = [n for n in GRAPH if n.startswith(("tocom_hub.core.", "tocom_hub.hub"))]
    assert GRAPH["tocom_hub.hub.load"] & set(names)  # the scan sees the edges
    assert circles(names) == []


def test_the_hub_names_are_the_same_objects():
    from tocom_hub.core.bank import card as bank_card
    from tocom_hub.core.bank import registry
    from tocom_hub.hub import errors, fetch, load, push

    assert tocom_hub.hub.download_bank is fetch.download_bank and tocom_hub.hub.load_bank is load.load_bank
    assert tocom_hub.load_bank is load.load_bank and tocom_hub.apply is load.apply is tocom_hub.hub.apply
    assert tocom_hub.hub.push_bank is push.push_bank and tocom_hub.hub.bank_facts is bank_card.bank_facts
    assert tocom_hub.hub.BankNotFoundError is errors.BankNotFoundError
    assert tocom_hub.register_bank is registry.register_bank is tocom_hub.hub.register_bank

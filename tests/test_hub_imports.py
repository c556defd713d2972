"""Issue 20: no module of tocom_hub/core/ imports, directly or transitively, a module that makes a network request.

A fresh interpreter refuses to create sockets and to import the network modules (huggingface_hub's download,
upload and HTTP modules, requests, httpx, urllib3, aiohttp, tocom_hub.hub); it then imports every core module and
uses the core (a bank saved with its card, loaded, applied, switched, removed). timm itself imports huggingface_hub's
download code when it can, and copes when it cannot, so the refusal is what tells the core's imports apart.
A deliberately wrong variant (a core module importing ``huggingface_hub.file_download``) is shown to fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from import_graph import MODULES, ROOT

NETWORK = [
    "huggingface_hub.file_download",
    "huggingface_hub.hf_api",
    "huggingface_hub.hub_mixin",
    "huggingface_hub.repocard",
    "huggingface_hub._commit_api",
    "huggingface_hub.utils._http",
    "requests",
    "httpx",
    "httpx2",
    "urllib3",
    "aiohttp",
    "tocom_hub.hub",
]

_PROBE = r"""
import importlib, importlib.abc, json, socket, sys
NETWORK = json.loads(sys.argv[1]); CORE = json.loads(sys.argv[2]); EXTRA = sys.argv[3]
refused = []

def denied(name):
    return any(name == n or name.startswith(n + ".") for n in NETWORK)

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if denied(name):
            refused.append(name)
            raise ImportError(f"network module {name} refused")
        return None

class NoSocket(socket.socket):  # a class, so that modules subclassing socket.socket (ssl) still import
    def __init__(self, *args, **kwargs):
        raise OSError("socket creation refused by the test")

def no_connection(*args, **kwargs):
    raise OSError("socket creation refused by the test")

sys.meta_path.insert(0, Refuse())
socket.socket = NoSocket
socket.create_connection = no_connection
errors = {}
for name in CORE:
    try:
        importlib.import_module(name)
    except Exception as e:
        errors[name] = f"{type(e).__name__}: {e}"
if EXTRA:
    try:
        exec(EXTRA, {})
    except Exception as e:
        errors["<use>"] = f"{type(e).__name__}: {e}"
print("@@" + json.dumps({"errors": errors, "loaded": sorted(n for n in sys.modules if denied(n)),
                        "refused_by_timm": sorted(set(refused))}))
"""

_USE = r"""
import os, tempfile, timm, torch
from tocom_hub.core.bank.module import ToComBank
from tocom_hub.core.compensation import api as compensate
torch.manual_seed(0)
model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                          embed_dim=32, num_heads=2)
bank = ToComBank.for_model(model, r_max=2, rank=1)
folder = os.path.join(tempfile.mkdtemp(), "bank")
bank.save_pretrained(folder)
assert sorted(os.listdir(folder)) == ["README.md", "tocom.safetensors", "tocom_config.json"]
compensate.apply(model, 0, 2, folder)
compensate.set_target_r(model, 1)
compensate.remove(model)
try:
    ToComBank.from_pretrained("org/name")
except FileNotFoundError as e:
    assert "load_bank" in str(e)
"""


def _core_modules():
    return sorted(n for n in MODULES if n == "tocom_hub.core" or n.startswith("tocom_hub.core."))


def _probe(core, use=""):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(NETWORK), json.dumps(core), use],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(ROOT),
    )
    marker = proc.stdout.rpartition("@@")[2]
    assert marker, proc.stderr
    return json.loads(marker)


@pytest.mark.slow  # ~10 s: a fresh interpreter imports torch, timm and the whole core
def test_the_core_imports_and_runs_without_any_network_module():
    core = _core_modules()
    assert len(core) > 20 and "tocom_hub.core.bank.module" in core and "tocom_hub.core.compensation.api" in core
    out = _probe(core, _USE)
    assert out["errors"] == {}, out["errors"]
    assert out["loaded"] == [], out["loaded"]
    # the refusal was active: timm asked for huggingface_hub's download code and was turned away
    assert any(n.startswith("huggingface_hub.") for n in out["refused_by_timm"]), out


def test_a_core_module_importing_download_code_is_caught(tmp_path):
    """The probe is not vacuous: code that imports huggingface_hub.file_download fails it."""
    bad = "import tocom_hub.core.bank.module\nimport huggingface_hub.file_download\n"
    out = _probe(["tocom_hub.core.bank.module"], bad)
    assert "<use>" in out["errors"] and "refused" in out["errors"]["<use>"]

"""Shared helpers of the Hub tests (test_bank_repo, test_hub_download, test_hub_push, test_bank_card, test_registry,
test_hub).

The real huggingface_hub client talks HTTP to ``tests/hub_server.py`` (``HF_ENDPOINT`` is set in
conftest.py); nothing in huggingface_hub is patched. Expected values come from independent sources: the
files we committed, a naive per-group loop for the merged weights, the closed-form parameter count.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import timm
import torch

from tocom_hub import ToComBank

ROOT = Path(__file__).resolve().parents[1]
TIMM_NAME = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # timm's default tag for the architecture
R_MAX, RANK = 4, 2


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
    """Naive reference for W' = W + s Σ_{i=m}^{n-1} B_i A_i (groups of lora_B, lora_A) on the q and v rows."""
    out = []
    for b, blk in enumerate(model.blocks):
        w = blk.attn.qkv.weight.detach().double().clone()
        d = w.shape[1]
        for t, row in (("q", 0), ("v", 2 * d)):
            for i in range(m, n):
                up_i = bank.lora_B[t][b][:, i * RANK : (i + 1) * RANK].double()
                down_i = bank.lora_A[t][b][i * RANK : (i + 1) * RANK].double()
                w[row : row + d] += bank.config.scale * (up_i @ down_i)
        out.append(w)
    return out


def n_params(embed_dim: int = 64, depth: int = 2, targets: int = 2) -> int:
    return R_MAX * depth * targets * RANK * (embed_dim + embed_dim)


def commit_bank_repo(hub_server, tmp_path):
    """``org/bank`` on the test Hub holding a bank for ``tiny_vit()``; returns (bank, files, commit sha)."""
    bank = make_bank(tiny_vit())
    files = bank_files(bank, tmp_path)
    sha = hub_server.commit("org/bank", files)
    return bank, files, sha


def card_snippet(card_text: str) -> str:
    """The code block of the card's "Use it" section."""
    section = card_text.split("## Use it", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_card_snippet(card_text: str, repo_id: str, bank_dir: str) -> torch.nn.Module:
    """Exec the snippet with the bank from ``bank_dir`` instead of the Hub and no weights download."""
    code = card_snippet(card_text)
    assert f'bank="{repo_id}"' in code
    code = code.replace(f'bank="{repo_id}"', f"bank={bank_dir!r}").replace("pretrained=True", "pretrained=False")
    ns: dict = {}
    exec(compile(code, "<card snippet>", "exec"), ns)
    return ns["model"]

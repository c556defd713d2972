"""ToComBank (core/bank/module.py): construction, peft's factor names, the delta arithmetic vs a naive loop,
save/load."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from bank_helpers import naive_delta, random_groups
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import make_timm, make_vit

from tocom_hub import ToComBank, ToComConfig
from tocom_hub.core.bank.module import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME


@pytest.fixture(scope="module")
def model():
    return make_vit("cls_token")  # embed 64, depth 3, 2 heads


@pytest.fixture
def bank(model):
    b = ToComBank.for_model(model, r_max=5, rank=2, targets=("q", "v"))
    random_groups(b, seed=1)
    return b


# -- construction ---------------------------------------------------------------------------------


def test_for_model_reads_dims_and_metadata():
    model = make_timm("vit_tiny_patch16_224")
    bank = ToComBank.for_model(model, r_max=16, rank=2)
    cfg = bank.config
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.attn_dim) == (64, 3, 2, None)
    assert (cfg.r_max, cfg.rank, cfg.targets, cfg.method, cfg.scale) == (16, 2, ("q", "v"), "tome", 0.1)
    assert cfg.base_model == "vit_tiny_patch16_224" and cfg.pretrained_tag == "augreg_in21k_ft_in1k"
    assert cfg.base_model_id == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert cfg.format_version == FORMAT_VERSION
    assert tuple(bank.lora_B["q"].shape) == (3, 64, 32) and tuple(bank.lora_A["v"].shape) == (3, 32, 64)


def test_lora_init_is_a_no_op_with_nonzero_down_factors(model):
    bank = ToComBank.for_model(model, r_max=4, rank=3, targets=("q", "k", "v", "proj"))
    for t in bank.targets:
        assert not bank.lora_B[t].any()
        down = bank.lora_A[t]
        assert down.abs().max() <= 1 / math.sqrt(down.shape[-1]) and down.std() > 0
        assert not bank.delta(1, t, 0, 4).any()


def test_deit_base_parameter_count_matches_paper():
    cfg = ToComConfig(embed_dim=768, depth=12, num_heads=12, r_max=16, rank=2)
    bank = ToComBank(cfg, device="meta")
    assert bank.num_parameters() == 1_179_648  # paper §4.1: 1.2M for DeiT-B = 16 × 12 × 2 × (768·2 + 2·768)


def test_attn_dim_and_proj_shapes():
    cfg = ToComConfig(embed_dim=64, depth=2, num_heads=2, attn_dim=96, targets=("q", "proj"), r_max=3)
    bank = ToComBank(cfg)
    assert tuple(bank.lora_B["q"].shape) == (2, 96, 6) and tuple(bank.lora_A["q"].shape) == (2, 6, 64)
    assert tuple(bank.lora_B["proj"].shape) == (2, 64, 6) and tuple(bank.lora_A["proj"].shape) == (2, 6, 96)


# -- arithmetic -----------------------------------------------------------------------------------


def test_delta_matches_naive_loop(model):
    bank = ToComBank.for_model(model, r_max=5, rank=2, targets=("q", "k", "v", "proj"))
    groups = random_groups(bank, seed=3)
    for t in bank.targets:
        for b in range(bank.depth):
            for m, n in [(0, 5), (5, 0), (1, 4), (4, 1), (2, 3), (3, 3)]:
                got = bank.delta(b, t, m, n)
                ref = naive_delta(groups, t, b, m, n, bank.scale)
                assert got.dtype == torch.float32
                torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-6 * max(ref.abs().max().item(), 1))
    assert torch.allclose(bank.delta(0, "q", 0, 5, scale=0.05), bank.delta(0, "q", 0, 5) / 2, atol=1e-7)


def test_delta_invariants(bank):
    for b in range(bank.depth):
        for t in bank.targets:
            d = lambda m, n, b=b, t=t: bank.delta(b, t, m, n).double()  # noqa: E731
            torch.testing.assert_close(d(1, 3) + d(3, 5), d(1, 5), rtol=0, atol=1e-6)  # m→n then n→k = m→k
            torch.testing.assert_close(d(4, 2) + d(2, 0), d(4, 0), rtol=0, atol=1e-6)
            torch.testing.assert_close(d(0, 4) + d(4, 2), d(0, 2), rtol=0, atol=1e-6)  # up then down
            torch.testing.assert_close(d(4, 1), -d(1, 4), rtol=0, atol=0)  # n→m = −(m→n)
            assert not d(2, 2).any()  # m = n: no-op


def test_delta_rejects_bad_arguments(bank):
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        bank.delta(0, "q", 0, 6)
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        bank.delta(0, "q", -1, 2)
    with pytest.raises(ValueError, match="target"):
        bank.delta(0, "k", 0, 1)
    with pytest.raises(ValueError, match="block"):
        bank.delta(3, "q", 0, 1)


# -- files ----------------------------------------------------------------------------------------


def test_save_load_round_trip(bank, tmp_path):
    bank.config.training_recipe = {"epochs": 10}
    bank.save_pretrained(tmp_path / "b")
    assert sorted(os.listdir(tmp_path / "b")) == ["README.md", WEIGHTS_NAME, CONFIG_NAME]  # no temp files left behind
    loaded = ToComBank.from_pretrained(tmp_path / "b")
    assert loaded.config == bank.config
    for k, v in bank.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert all(p.requires_grad for p in loaded.parameters())
    # a lone safetensors file is self-describing
    alone = ToComBank.from_pretrained(tmp_path / "b" / WEIGHTS_NAME)
    assert alone.config == bank.config and torch.equal(alone.lora_B["q"], bank.lora_B["q"])
    assert (os.stat(tmp_path / "b" / WEIGHTS_NAME).st_mode & 0o777) == 0o644


def test_files_are_plain_safetensors_and_json(bank, tmp_path):
    bank.save_pretrained(tmp_path)
    raw = (tmp_path / WEIGHTS_NAME).read_bytes()
    assert not raw.startswith(b"\x80") and b"PK\x03\x04" not in raw[:8]  # not a pickle / torch zip
    tensors = load_file(tmp_path / WEIGHTS_NAME)  # safetensors alone reads it
    assert set(tensors) == {"lora_A.q", "lora_A.v", "lora_B.q", "lora_B.v"}
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as f:
        meta = f.metadata()
    assert meta["tocom_format_version"] == str(FORMAT_VERSION)
    assert json.loads(meta["tocom_config"])["r_max"] == 5
    json.loads((tmp_path / CONFIG_NAME).read_text())


def test_fp16_save_load(bank, tmp_path):
    half = copy.deepcopy(bank).half()
    half.save_pretrained(tmp_path / "h")
    with safe_open(str(tmp_path / "h" / WEIGHTS_NAME), framework="pt") as f:
        assert f.get_tensor("lora_B.q").dtype == torch.float16
    size = os.path.getsize(tmp_path / "h" / WEIGHTS_NAME)
    assert size < bank.num_parameters() * 2 + 4096
    loaded = ToComBank.from_pretrained(tmp_path / "h")
    assert loaded.lora_B["q"].dtype == torch.float16 and torch.equal(loaded.lora_B["q"], half.lora_B["q"])
    as32 = ToComBank.from_pretrained(tmp_path / "h", dtype=torch.float32)
    assert as32.lora_A["v"].dtype == torch.float32 and torch.equal(as32.lora_A["v"], half.lora_A["v"].float())
    # dtype= on save, the bank itself unchanged
    bank.save_pretrained(tmp_path / "h2", dtype=torch.float16)
    assert bank.lora_B["q"].dtype == torch.float32
    assert ToComBank.from_pretrained(tmp_path / "h2").lora_B["q"].dtype == torch.float16


def test_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        ToComBank.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        ToComBank.from_pretrained("./not/here.safetensors")
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        ToComBank.from_pretrained(tmp_path)  # a directory without a bank


# -- peft's names ---------------------------------------------------------------------------------


def test_lora_A_is_down_and_lora_B_is_up_as_in_peft(bank):
    """``delta`` = s · lora_B · lora_A on the group slice, like peft's ``lora_B @ lora_A``."""
    sl = slice(1 * bank.rank, 4 * bank.rank)
    for t in bank.targets:
        down, up = bank.lora_A[t][2, sl].double(), bank.lora_B[t][2, :, sl].double()  # [h, d_in], [d_out, h]
        torch.testing.assert_close(bank.delta(2, t, 1, 4).double(), bank.scale * up @ down, rtol=0, atol=1e-6)


def test_format_1_names_are_gone(bank):
    """Format 1's names (``A`` = up, ``B`` = down) were never published: no aliases, no old state-dict keys."""
    assert not hasattr(bank, "A") and not hasattr(bank, "B")
    assert [n for n, _ in bank.named_parameters()] == ["lora_B.q", "lora_B.v", "lora_A.q", "lora_A.v"]
    old = {f"{'A' if k.startswith('lora_B') else 'B'}.{k.split('.')[1]}": v for k, v in bank.state_dict().items()}
    with pytest.raises(RuntimeError, match="Missing key"):
        ToComBank(bank.config).load_state_dict(old)

"""convert_official: a checkpoint built here in the official layout gives the official formula's outputs."""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
from tiny_models import make_vit

import tocom_hub
from tocom_hub import convert_official

K, H, D, DEPTH = 16, 2, 64, 3  # official layout: inner dim 16·h
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def official_state(seed=0, std=0.3, prefix=""):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(DEPTH):
        for t in ("q", "v"):
            sd[f"{prefix}blocks.{i}.attn.{t}_tocom.adapter_down.weight"] = torch.randn(K * H, D, generator=g) * std
            sd[f"{prefix}blocks.{i}.attn.{t}_tocom.adapter_up.weight"] = torch.randn(D, K * H, generator=g) * std
    return sd


def official_mask(m, n):
    """The official ±1/0 mask over the 16·h inner dims: group g → g+1 sits at [16h − h(g+1), 16h − hg)."""
    mask = torch.zeros(K * H)
    lo, hi = min(m, n), max(m, n)
    for g in range(lo, hi):
        mask[K * H - H * (g + 1) : K * H - H * g] = 1.0 if n > m else -1.0
    return mask


def official_forward(sd, m, n, s, x):
    """Adapters in the forward, official style: q/v outputs += s·((x·downᵀ)⊙mask)·upᵀ."""
    model = tocom_hub.patch(make_vit("cls_token"), method="tome")
    tocom_hub.set_r(model, n)
    mask = official_mask(m, n)

    def hook_for(i):
        def hook(module, args, out):
            (inp,) = args
            out = out.clone()
            for j, t in enumerate(("q", None, "v")):
                if t is None:
                    continue
                down = sd[f"blocks.{i}.attn.{t}_tocom.adapter_down.weight"]
                up = sd[f"blocks.{i}.attn.{t}_tocom.adapter_up.weight"]
                out[..., j * D : (j + 1) * D] += s * ((inp @ down.t()) * mask) @ up.t()
            return out

        return hook

    for i, blk in enumerate(model.blocks):
        blk.attn.qkv.register_forward_hook(hook_for(i))
    with torch.no_grad():
        return model(x)


def save(obj, path):
    torch.save(obj, path)
    return path


def test_config_and_deltas(tmp_path):
    sd = official_state()
    bank = convert_official(save(sd, tmp_path / "tocom.pth"), num_heads=2)
    cfg = bank.config
    assert (cfg.r_max, cfg.rank, cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.targets, cfg.method) == (
        16,
        2,
        3,
        64,
        2,
        ("q", "v"),
        "tome",
    )
    for i in range(DEPTH):
        for t in ("q", "v"):
            down = sd[f"blocks.{i}.attn.{t}_tocom.adapter_down.weight"].double()
            up = sd[f"blocks.{i}.attn.{t}_tocom.adapter_up.weight"].double()
            for m, n in [(0, 16), (16, 0), (3, 9), (12, 5), (7, 8)]:
                ref = 0.1 * (up * official_mask(m, n).double()) @ down
                torch.testing.assert_close(bank.delta(i, t, m, n).double(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("m, n", [(0, 16), (16, 0), (4, 10)])
@pytest.mark.parametrize("merge", [True, False])
def test_outputs_equal_official_formula(tmp_path, m, n, merge):
    sd = official_state(seed=1)
    bank = convert_official(save(sd, tmp_path / "tocom.pth"), num_heads=2)
    model = tocom_hub.apply(make_vit("cls_token"), m, n, bank=bank, merge=merge)
    with torch.no_grad():
        ours = model(X)
    ref = official_forward(sd, m, n, 0.1, X)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    plain = tocom_hub.patch(make_vit("cls_token"))
    tocom_hub.set_r(plain, n)
    with torch.no_grad():
        assert (plain(X) - ref).abs().max() > 1e-3  # the adapters matter


def test_wrapped_and_prefixed_checkpoint(tmp_path):
    sd = official_state(seed=2, prefix="module.")
    sd["module.head.weight"] = torch.zeros(10, D)  # backbone tensors are ignored
    ckpt = {"model": collections.OrderedDict(sd), "epoch": 9}
    bank = convert_official(
        save(ckpt, tmp_path / "ckpt.pth"), num_heads=2, method="evit", scale=0.05, base_model="vit_tiny_patch16_224"
    )
    assert bank.method == "evit" and bank.scale == 0.05 and bank.config.base_model == "vit_tiny_patch16_224"
    plain = convert_official(save(official_state(seed=2), tmp_path / "plain.pth"), num_heads=2)
    for t in ("q", "v"):
        assert torch.equal(bank.lora_A[t], plain.lora_A[t]) and torch.equal(bank.lora_B[t], plain.lora_B[t])


def test_num_heads_default_warns(tmp_path):
    with pytest.warns(UserWarning, match="num_heads=1"):
        bank = convert_official(save(official_state(), tmp_path / "t.pth"))
    assert bank.config.num_heads == 1


def test_round_trip_through_our_format(tmp_path):
    bank = convert_official(save(official_state(seed=3), tmp_path / "t.pth"), num_heads=2)
    bank.half().save_pretrained(tmp_path / "bank")
    again = tocom_hub.ToComBank.from_pretrained(tmp_path / "bank")
    assert again.config == bank.config and torch.equal(again.lora_A["v"], bank.lora_A["v"])


def test_down_becomes_lora_A_and_up_becomes_lora_B_group_by_group(tmp_path):
    sd = official_state(seed=4)
    bank = convert_official(save(sd, tmp_path / "t.pth"), num_heads=2)
    for t in ("q", "v"):
        for i in range(DEPTH):
            down = sd[f"blocks.{i}.attn.{t}_tocom.adapter_down.weight"]
            up = sd[f"blocks.{i}.attn.{t}_tocom.adapter_up.weight"]
            for g in range(K):  # official group g sits at [16h − h(g+1), 16h − hg); ours at [g·h, (g+1)·h)
                official = slice(K * H - H * (g + 1), K * H - H * g)
                assert torch.equal(bank.lora_A[t][i, g * H : (g + 1) * H], down[official])
                assert torch.equal(bank.lora_B[t][i, :, g * H : (g + 1) * H], up[:, official])


class NotAllowed:  # anything weights_only=True must refuse to unpickle
    pass


def test_errors(tmp_path):
    sd = official_state()
    broken = dict(sd)
    del broken["blocks.1.attn.v_tocom.adapter_up.weight"]
    with pytest.raises(ValueError, match="block 1 target 'v' lacks adapter_up"):
        convert_official(save(broken, tmp_path / "a.pth"), num_heads=2)
    with pytest.raises(ValueError, match="not a multiple of r_max=12"):
        convert_official(save(sd, tmp_path / "b.pth"), num_heads=2, r_max=12)
    with pytest.raises(ValueError, match="no 'blocks"):
        convert_official(save({"x": torch.zeros(1)}, tmp_path / "c.pth"), num_heads=2)
    with pytest.raises(ValueError, match="unexpected ToCom tensor"):
        convert_official(
            save(dict(sd, **{"blocks.0.attn.q_tocom.scale": torch.ones(1)}), tmp_path / "d.pth"), num_heads=2
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="weights-only"):
            convert_official(save({"obj": NotAllowed()}, tmp_path / "e.pth"), num_heads=2)
    (tmp_path / "f.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="f.pth"):
        convert_official(tmp_path / "f.pth", num_heads=2)

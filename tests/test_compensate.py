"""apply / set_target_r / set_pair / remove on patched tiny timm ViTs, against a naive closed form."""

from __future__ import annotations

import pytest
import torch
from bank_helpers import clone_state, rel_err, state_hash, weight_rows
from compensate_helpers import R, X, assert_closed_form, bank_for, fresh
from tiny_models import make_vit
from torch import nn

import tocom_hub
from tocom_hub import compensate
from tocom_hub.core.bank.module import WEIGHTS_NAME

# -- the closed form and its invariants -----------------------------------------------------------


@pytest.mark.parametrize("m, n", [(0, 6), (6, 0), (2, 5), (5, 2), (0, 1)])
@pytest.mark.parametrize("targets", [("q", "v"), ("q", "k", "v", "proj")])
def test_apply_matches_closed_form(m, n, targets):
    model = fresh()
    original = clone_state(model)
    bank, groups = bank_for(model, targets=targets)
    tocom_hub.apply(model, m, n, bank=bank)
    assert tocom_hub.is_patched(model) and tocom_hub.get_r(model) == n
    assert_closed_form(model, original, groups, bank, m, n)
    # everything the bank does not adapt is untouched, bit for bit
    after = model.state_dict()
    for k, v in original.items():
        if not (k.endswith("attn.qkv.weight") or ("proj" in targets and k.endswith("attn.proj.weight"))):
            assert torch.equal(after[k], v), k


def test_scale_argument():
    model = fresh()
    original = clone_state(model)
    bank, groups = bank_for(model)
    tocom_hub.apply(model, 1, 4, bank=bank, scale=0.05)
    assert_closed_form(model, original, groups, bank, 1, 4, s=0.05)


def test_chain_inverse_and_noop():
    model = fresh()
    original = clone_state(model)
    bank, groups = bank_for(model)
    # m → n then n → k == m → k
    tocom_hub.apply(model, 1, 3, bank=bank)
    tocom_hub.set_target_r(model, 6)
    chained = {(b, t): weight_rows(model, b, t).clone() for b in range(3) for t in ("q", "v")}
    ref = fresh()
    tocom_hub.apply(ref, 1, 6, bank=bank)
    for (b, t), w in chained.items():
        assert rel_err(w, weight_rows(ref, b, t)) <= 1e-6
    assert_closed_form(model, original, groups, bank, 1, 6)
    # n → m == −(m → n)
    up, down = fresh(), fresh()
    tocom_hub.apply(up, 2, 5, bank=bank)
    tocom_hub.apply(down, 5, 2, bank=bank)
    w0 = fresh()
    for b in range(3):
        for t in ("q", "v"):
            d_up = weight_rows(up, b, t).double() - weight_rows(w0, b, t).double()
            d_down = weight_rows(down, b, t).double() - weight_rows(w0, b, t).double()
            assert rel_err(d_down, -d_up) <= 1e-5  # differences of rounded weights: a few ulp of W
    # m == n: weights untouched, bit for bit
    same = fresh()
    h = state_hash(same)
    tocom_hub.apply(same, 4, 4, bank=bank)
    assert state_hash(same) == h


# -- remove ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("merge", [True, False])
def test_apply_then_remove_is_bit_exact(merge):
    model = fresh()
    original = clone_state(model)
    bank, _ = bank_for(model, targets=("q", "k", "v", "proj"))
    tocom_hub.apply(model, 0, 6, bank=bank, merge=merge)
    for r in (3, 0, 6, 1, 5):
        tocom_hub.set_target_r(model, r)
    model(X)
    tocom_hub.remove(model)
    after = model.state_dict()
    assert after.keys() == original.keys()
    assert all(torch.equal(after[k], v) for k, v in original.items())
    assert not tocom_hub.is_patched(model) and compensate.get_compensation(model) is None
    for blk in model.blocks:
        assert not blk.attn.qkv._forward_hooks and not blk.attn.proj._forward_hooks
        assert type(blk.attn.qkv) is torch.nn.Linear and type(blk.attn.proj) is torch.nn.Linear
    torch.testing.assert_close(model(X), fresh()(X), rtol=0, atol=0)
    tocom_hub.remove(model)  # no-op without a bank


def test_remove_keeps_a_patch_the_user_made():
    model = fresh()
    tocom_hub.patch(model, method="tome")
    tocom_hub.set_r(model, 2)
    bank, _ = bank_for(model)
    tocom_hub.apply(model, 0, 4, bank=bank)
    tocom_hub.remove(model)
    assert tocom_hub.is_patched(model) and tocom_hub.get_r(model) == 4


def test_state_dict_and_parameters_never_contain_the_bank():
    model = fresh()
    keys = set(model.state_dict())
    n_params = len(list(model.parameters()))
    bank, _ = bank_for(model)
    for merge in (True, False):
        tocom_hub.apply(model, 0, 3, bank=bank, merge=merge)
        marker = (
            {"tocom_compensation"} if merge else set()
        )  # merged: what the weights hold (core/compensation/marker.py)
        assert set(model.state_dict()) == keys | marker and len(list(model.parameters())) == n_params


# -- validation before mutation -------------------------------------------------------------------


def _bad_cases(tmp_path):
    good = fresh()
    ok_bank, _ = bank_for(good)
    ok_bank.save_pretrained(tmp_path / "ok")
    trunc = tmp_path / "trunc"
    ok_bank.save_pretrained(trunc)
    data = (trunc / WEIGHTS_NAME).read_bytes()
    (trunc / WEIGHTS_NAME).write_bytes(data[: len(data) - 100])
    tampered = tmp_path / "tampered"
    ok_bank.save_pretrained(tampered)
    raw = bytearray((tampered / WEIGHTS_NAME).read_bytes())
    raw[-3] ^= 0x01
    (tampered / WEIGHTS_NAME).write_bytes(bytes(raw))
    return {
        "embed_dim": (
            dict(bank=bank_for(make_vit("cls_token", embed_dim=96, num_heads=2))[0]),
            ValueError,
            "embed_dim 96",
        ),
        "depth": (dict(bank=bank_for(fresh(depth=2))[0]), ValueError, "depth 2"),
        "num_heads": (dict(bank=bank_for(make_vit("cls_token", num_heads=4))[0]), ValueError, "num_heads 4"),
        "bank_method": (dict(bank=bank_for(good, method="evit")[0], method="tome"), ValueError, "evit"),
        "source_above_R": (dict(source_r=R + 1), ValueError, r"source_r .*\[0, 6\]"),
        "target_negative": (dict(target_r=-1), ValueError, r"target_r .*\[0, 6\]"),
        "target_bool": (dict(target_r=True), ValueError, "target_r"),
        "scale_nan": (dict(scale=float("nan")), ValueError, "scale"),
        "r_beyond_token_count": (
            dict(bank=bank_for(good, r_max=40)[0], target_r=40),
            ValueError,
            r"r must be an int in \[0, 32\].*; got 40$",
        ),
        "truncated_file": (dict(bank=str(trunc)), ValueError, "truncated"),
        "tampered_file": (dict(bank=str(tampered / WEIGHTS_NAME)), ValueError, "checksum"),
        "missing_file": (dict(bank=str(tmp_path / "none.safetensors")), FileNotFoundError, "none"),
        "bank_type": (dict(bank=3), TypeError, "bank must be"),
        "hub_kwargs_with_local_bank": (dict(bank=ok_bank, revision="v1"), TypeError, "revision"),
    }, ok_bank


def test_errors_leave_model_unchanged(tmp_path):
    cases, ok_bank = _bad_cases(tmp_path)
    for name, (kwargs, exc, match) in cases.items():
        kwargs = dict(dict(source_r=0, target_r=3, bank=ok_bank), **kwargs)
        model = fresh()
        h = state_hash(model)
        with pytest.raises(exc, match=match):
            tocom_hub.apply(model, **kwargs)
        assert state_hash(model) == h, name
        assert not tocom_hub.is_patched(model) and compensate.get_compensation(model) is None, name

    # a model that already carries a bank keeps it, merged weights and r included
    model = fresh()
    tocom_hub.apply(model, 1, 4, bank=ok_bank)
    h, state = state_hash(model), compensate.get_compensation(model)
    for name, (kwargs, exc, match) in cases.items():
        kwargs = dict(dict(source_r=0, target_r=3, bank=ok_bank), **kwargs)
        with pytest.raises(exc, match=match):
            tocom_hub.apply(model, **kwargs)
        assert state_hash(model) == h and compensate.get_compensation(model) is state, name
        assert tocom_hub.get_r(model) == 4 and (state.source_r, state.target_r) == (1, 4), name
    for bad in (R + 1, -1, 2.0):
        with pytest.raises(ValueError, match="target_r"):
            tocom_hub.set_target_r(model, bad)
    assert state_hash(model) == h and tocom_hub.get_r(model) == 4


def test_patched_for_another_method_or_not_a_vit():
    model = fresh()
    tocom_hub.patch(model, method="evit")
    bank, _ = bank_for(model, method="tome")
    h = state_hash(model)
    with pytest.raises(ValueError, match="patched for 'evit'"):
        tocom_hub.apply(model, 0, 2, bank=bank)
    assert state_hash(model) == h and tocom_hub.get_method(model) == "evit"
    with pytest.raises(TypeError, match="Linear"):
        tocom_hub.apply(nn.Linear(4, 4), 0, 2, bank=bank)
    with pytest.raises(ValueError, match="no ToCom bank"):
        tocom_hub.set_target_r(fresh(), 2)


def test_bank_from_directory_and_file(tmp_path):
    model = fresh()
    bank, groups = bank_for(model)
    bank.save_pretrained(tmp_path)
    original = clone_state(model)
    tocom_hub.apply(model, 0, 5, bank=str(tmp_path))
    assert_closed_form(model, original, groups, bank, 0, 5)
    tocom_hub.apply(model, 5, 0, bank=tmp_path / WEIGHTS_NAME)
    assert_closed_form(model, original, groups, bank, 5, 0)


def test_applying_again_replaces_the_bank():
    model = fresh()
    original = clone_state(model)
    b1, _ = bank_for(model, seed=1)
    b2, g2 = bank_for(model, seed=2, targets=("q", "k", "v"))
    tocom_hub.apply(model, 0, 6, bank=b1)
    tocom_hub.set_target_r(model, 2)
    tocom_hub.apply(model, 3, 1, bank=b2, merge=True)
    ref = fresh()
    tocom_hub.apply(ref, 3, 1, bank=b2)
    assert state_hash(model) == state_hash(ref)
    assert_closed_form(model, original, g2, b2, 3, 1)
    tocom_hub.apply(model, 3, 1, bank=b2, merge=False)  # switch mode: weights back to W₀
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    tocom_hub.remove(model)
    assert not tocom_hub.is_patched(model)  # apply patched it first, so remove unpatches


# -- unmerged (training) mode ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tome", "evit"])
@pytest.mark.parametrize("m, n", [(0, 6), (6, 2)])
def test_merged_equals_unmerged(method, m, n):
    merged, unmerged = fresh(), fresh()
    bank, _ = bank_for(merged, method=method)
    tocom_hub.apply(merged, m, n, bank=bank, merge=True)
    tocom_hub.apply(unmerged, m, n, bank=bank, merge=False)
    with torch.no_grad():
        a, b = merged(X), unmerged(X)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    plain = tocom_hub.patch(fresh(), method=method)
    tocom_hub.set_r(plain, n)
    with torch.no_grad():
        assert (plain(X) - a).abs().max() > 1e-3  # the bank does change the output


@pytest.mark.parametrize("merge", [True, False])
def test_disabled_runs_the_plain_model(merge):
    model = fresh()
    bank, _ = bank_for(model)
    tocom_hub.apply(model, 0, 5, bank=bank, merge=merge)
    plain = tocom_hub.patch(fresh())
    tocom_hub.set_r(plain, 5)
    with torch.no_grad():
        compensated = model(X)
        with compensate.disabled(model):
            torch.testing.assert_close(model(X), plain(X), rtol=0, atol=1e-6)
        torch.testing.assert_close(model(X), compensated, rtol=0, atol=1e-6)
    assert (compensated - plain(X)).abs().max() > 1e-3


@pytest.mark.parametrize("merge", [True, False])
def test_disabled_nests_and_survives_a_bank_replaced_inside(merge):
    """Nested ``disabled`` blocks keep the bank off until the outer one ends; a bank applied inside the
    block is not touched when the block ends (it is the model's bank now, at its own pair)."""
    model = fresh()
    original = clone_state(model)
    b1, _ = bank_for(model, seed=1)
    b2, g2 = bank_for(model, seed=2)
    plain = tocom_hub.patch(fresh())
    with torch.no_grad():
        tocom_hub.apply(model, 0, 5, bank=b1, merge=merge)
        compensated = model(X)
        with compensate.disabled(model):
            with compensate.disabled(model):
                pass
            tocom_hub.set_r(plain, 5)
            torch.testing.assert_close(model(X), plain(X), rtol=0, atol=1e-6)  # still off after the inner block
            tocom_hub.set_target_r(model, 2)  # a switch while off: remembered, applied on exit
        tocom_hub.set_r(plain, 2)
        assert (model(X) - plain(X)).abs().max() > 1e-3 and compensate.get_compensation(model).target_r == 2
        tocom_hub.set_target_r(model, 5)
        torch.testing.assert_close(model(X), compensated, rtol=0, atol=1e-6)
        with compensate.disabled(model):
            tocom_hub.apply(model, 1, 3, bank=b2, merge=True)
        st = compensate.get_compensation(model)
        assert st.bank is b2 and st.enabled and (st.source_r, st.target_r) == (1, 3)
        assert_closed_form(model, original, g2, b2, 1, 3)
    tocom_hub.remove(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


# -- bad banks are refused before anything changes --------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("merge", [True, False])
def test_apply_refuses_an_in_memory_bank_with_non_finite_values(bad, merge):
    model = fresh()
    bank, _ = bank_for(model)
    with torch.no_grad():
        bank.lora_A["v"][1, 3, 5] = bad
    before = state_hash(model)
    with pytest.raises(ValueError, match=r"lora_A\.v contains NaN or inf"):  # the down factor (bank.lora_A)
        tocom_hub.apply(model, 0, 4, bank=bank, merge=merge)
    assert state_hash(model) == before and not tocom_hub.is_patched(model)
    assert compensate.get_compensation(model) is None


@pytest.mark.parametrize("scale", [1e30, 101.0, -0.1])
def test_apply_refuses_a_scale_out_of_bounds(scale):
    model = fresh()
    bank, _ = bank_for(model)
    before = state_hash(model)
    with pytest.raises(ValueError, match=r"scale must be a finite number in \[0, 100\]"):
        tocom_hub.apply(model, 0, 4, bank=bank, scale=scale)
    assert state_hash(model) == before and not tocom_hub.is_patched(model)


@pytest.mark.parametrize("merge", [True, False])
def test_patch_for_another_method_refused_while_a_bank_is_applied(merge):
    model = fresh()
    bank, groups = bank_for(model, method="tome")
    original = clone_state(model)
    tocom_hub.apply(model, 0, 4, bank=bank, merge=merge)
    before = state_hash(model)
    with pytest.raises(ValueError, match=r"bank trained for 'tome'.*'evit'.*tocom_hub.remove"):
        tocom_hub.patch(model, method="evit")
    assert state_hash(model) == before and tocom_hub.get_method(model) == "tome"
    tocom_hub.patch(model, method="tome")  # same method: settings update, still allowed
    if merge:
        assert_closed_form(model, original, groups, bank, 0, 4)
    tocom_hub.remove(model)
    tocom_hub.patch(model, method="evit")  # without the bank: fine
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_bank_for_another_backbone_of_the_same_shape_is_refused():
    from tiny_models import make_timm

    vit = make_timm("vit_tiny_patch16_224", depth=2)
    deit = make_timm("deit_tiny_patch16_224", depth=2)  # same dims, other weights
    bank, groups = bank_for(vit)
    assert bank.config.base_model == "vit_tiny_patch16_224"
    before = state_hash(deit)
    with pytest.raises(
        ValueError,
        match=r"trained for vit_tiny_patch16_224.*model is deit_tiny_patch16_224.*"
        r"ignore_base_model=True",
    ):
        tocom_hub.apply(deit, 0, 4, bank=bank)
    assert state_hash(deit) == before and not tocom_hub.is_patched(deit)
    original = clone_state(deit)
    tocom_hub.apply(deit, 0, 4, bank=bank, ignore_base_model=True)  # the explicit override
    assert_closed_form(deit, original, groups, bank, 0, 4)
    tocom_hub.apply(vit, 0, 4, bank=bank)  # the right backbone
    tagged, _ = bank_for(vit, base_model="vit_tiny_patch16_224.augreg_in21k")  # "arch.tag" names the same arch
    tocom_hub.apply(make_timm("vit_tiny_patch16_224", depth=2), 0, 4, bank=tagged)
    anonymous = fresh(depth=2)  # built from the class: no timm name, only the shapes are checked
    tocom_hub.apply(anonymous, 0, 4, bank=bank)


def test_apply_refuses_a_bank_file_without_checksum_unless_trusted(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = fresh()
    bank, groups = bank_for(model)
    bank.save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "tocom_sha256"}
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata=meta)
    original = clone_state(model)
    before = state_hash(model)
    with pytest.raises(ValueError, match="tocom_sha256.*trust_unverified=True"):
        tocom_hub.apply(model, 0, 4, bank=str(tmp_path))
    assert state_hash(model) == before and not tocom_hub.is_patched(model)
    tocom_hub.apply(model, 0, 4, bank=str(tmp_path), trust_unverified=True)
    assert_closed_form(model, original, groups, bank, 0, 4)


@pytest.mark.parametrize("merge", [True, False])
def test_apply_refuses_a_model_on_the_meta_device(merge):
    with torch.device("meta"):
        model = fresh()
    bank, _ = bank_for(fresh())
    with pytest.raises(ValueError, match=r"meta device.*to_empty"):
        tocom_hub.apply(model, 0, 4, bank=bank, merge=merge)
    assert not tocom_hub.is_patched(model) and compensate.get_compensation(model) is None
    model.to_empty(device="cpu")
    model.load_state_dict(fresh().state_dict())
    original = clone_state(model)
    tocom_hub.apply(model, 0, 4, bank=bank, merge=merge)  # with real weights: fine, and removable
    tocom_hub.remove(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())

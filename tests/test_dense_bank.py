"""Dense mode with a ToCom bank (the bank records the mode; the other mode is refused) and torch.compile."""

import copy

import pytest
import torch
from tiny_models import make_vit
from torch._dynamo.testing import CompileCounter

import tocom_hub
from tocom_hub import ToComBank, ToComConfig
from tocom_hub.core.compensation import api as compensate
from tocom_hub.core.patch import get_settings

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))


def _bank(model, **kw):
    bank = ToComBank.for_model(model, r_max=4, rank=2, **kw)
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(0, 0.05)
    return bank


def test_config_records_the_mode_and_round_trips(tmp_path):
    model = make_vit("cls_token")
    bank = _bank(model, dense=True, dense_ratio=8)
    bank.save_pretrained(tmp_path)
    loaded = ToComBank.from_pretrained(tmp_path)
    assert (loaded.dense, loaded.dense_ratio) == (True, 8)
    assert (ToComBank.for_model(model).dense, ToComBank.for_model(model).dense_ratio) == (False, None)
    for bad in (dict(dense=True), dict(dense=False, dense_ratio=4), dict(dense=True, dense_ratio=0)):
        with pytest.raises(ValueError, match="dense_ratio"):
            ToComConfig(embed_dim=64, depth=3, num_heads=2, **bad)


def test_bank_of_the_other_mode_is_refused_and_nothing_changes():
    model = make_vit("cls_token")
    tocom_hub.patch(model, dense=True, dense_ratio=8)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"dense \(k = 8·r\) mode but the bank was trained in regular mode"):
        tocom_hub.apply(model, 0, 2, bank=_bank(model))
    with pytest.raises(ValueError, match=r"dense \(k = 4·r\) mode"):
        tocom_hub.apply(model, 0, 2, bank=_bank(model, dense=True, dense_ratio=4))  # another ratio is another r
    assert compensate.get_compensation(model) is None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    regular = make_vit("cls_token")
    tocom_hub.patch(regular)
    with pytest.raises(ValueError, match="regular mode but the bank was trained in dense"):
        tocom_hub.apply(regular, 0, 2, bank=_bank(regular, dense=True, dense_ratio=8))


def test_dense_bank_patches_an_unpatched_model_densely_and_pins_the_mode():
    model = make_vit("cls_token")
    plain = copy.deepcopy(model)
    bank = _bank(model, dense=True, dense_ratio=8)
    tocom_hub.apply(model, 0, 3, bank=bank)
    assert get_settings(model)["dense"] and get_settings(model)["dense_ratio"] == 8
    with torch.no_grad():
        out = model.forward_features(X)
        assert out.shape == plain.forward_features(X).shape and torch.isfinite(out).all()
        tocom_hub.set_target_r(model, 0)
        assert (model(X) - plain(X)).abs().max() <= 1e-5  # source = target: the bank adds nothing
    with pytest.raises(ValueError, match="trained in dense"):
        tocom_hub.patch(model)  # switching the mode under a bank
    tocom_hub.remove(model)


def test_dense_compiles_fullgraph_and_switches_r_without_recompiling():
    torch._dynamo.reset()
    model = make_vit("registers")
    tocom_hub.patch(model, dense=True, dense_ratio=4)
    eager = copy.deepcopy(model)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        for r in (0, 3, 7):
            tocom_hub.set_r(model, r)
            compiled(X)
        warm = counter.frame_count
        for r in (7, 0, 3, 3, 7):
            tocom_hub.set_r(model, r)
            tocom_hub.set_r(eager, r)
            assert (compiled(X) - eager(X)).abs().max() <= 1e-5
    assert warm == 3 and counter.frame_count == warm
    torch._dynamo.reset()

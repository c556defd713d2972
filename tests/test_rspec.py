"""The one r rule (tocom_hub.core.rspec) and its callers: same message, nothing changed on a refusal."""

from __future__ import annotations

import numpy as np
import pytest
from bank_helpers import state_hash
from tiny_models import make_vit

import tocom_hub
from tocom_hub import compensate
from tocom_hub.core.bank.module import ToComBank
from tocom_hub.core.merge import max_merge
from tocom_hub.core.prune import max_prune
from tocom_hub.core.rspec import BANK_RANGE, check_r, check_r_values, is_r, model_r_limit, resolve_r


@pytest.mark.parametrize("bad", [True, False, 2.0, "2", None, -1, np.float32(2), np.bool_(True), [2]])
def test_check_r_rejects_non_ints_and_negatives(bad):
    assert not is_r(bad) or bad == -1
    with pytest.raises(ValueError, match=r"^r must be a non-negative int; got "):
        check_r(bad)


def test_check_r_accepts_numpy_ints_and_returns_int():
    for v in (0, 7, np.int64(7), np.int32(3), np.uint8(5)):
        got = check_r(v)
        assert got == int(v) and type(got) is int


def test_check_r_upper_bound_and_message_style():
    assert check_r(5, "target_r", r_max=5, why=BANK_RANGE) == 5
    with pytest.raises(ValueError) as e:
        check_r(6, "target_r", r_max=5, why=BANK_RANGE)
    assert str(e.value) == "target_r must be an int in [0, 5] (the bank's range); got 6"
    with pytest.raises(ValueError, match=r"^source r must be an int in \[0, 5\]; got -1$"):
        check_r(-1, "source r", r_max=5)


def test_check_r_values():
    assert check_r_values(range(3)) == [0, 1, 2]
    assert check_r_values((np.int64(4), 0), "target_rs") == [4, 0]
    for bad, match in [
        ([], "non-empty"),
        ("04", "non-empty sequence"),
        (4, "non-empty sequence"),
        ([0, 2.5], r"target_rs\[1\] must be a non-negative int; got 2.5"),
        ([0, 9], r"target_rs\[1\] must be an int in \[0, 8\] \(the bank's range\); got 9"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_r_values(
                bad, "target_rs", r_max=8 if bad == [0, 9] else None, why=BANK_RANGE if bad == [0, 9] else None
            )


def test_model_limit_per_method_and_dense():
    model = make_vit("cls_token")  # 64 patches + 1 class token, 3 blocks
    assert model_r_limit(model, "tome")[0] == max_merge(65, 1) == 32
    assert model_r_limit(model, "evit")[0] == max_prune(65, 1)
    limit, why = model_r_limit(model, "tome", dense_ratio=5)
    assert limit == 32 // 5 and "dense mode: k = 5·r" in why and "65 tokens (1 prefix)" in why


def test_resolve_r_forms_and_errors():
    model = make_vit("cls_token")
    assert resolve_r(model, 4, "tome") == [4, 4, 4]
    assert resolve_r(model, [1, np.int64(2), 32], "tome") == [1, 2, 32]
    assert all(type(v) is int for v in resolve_r(model, (np.int64(2),) * 3, "tome"))
    cases = [
        (33, "tome", 1, r"^r must be an int in \[0, 32\] \(the model sees 65 tokens \(1 prefix\) and tome removes"),
        ([0, 0, 33], "tome", 1, r"^r\[2\] must be an int in \[0, 32\]"),
        (7, "tome", 5, r"^r must be an int in \[0, 6\] \(dense mode: k = 5·r"),
        ([4, 4], "tome", 1, r"^r must be an int or a list of 3 ints \(one per block\); got 2 entries"),
        ([4, True, 4], "tome", 1, r"^r\[1\] must be a non-negative int; got True"),
        (-1, "evit", 1, r"^r must be a non-negative int; got -1"),
        (2.0, "tome", 1, r"^r must be an int or a list of 3 ints"),
        (True, "tome", 1, r"^r must be an int or a list of 3 ints"),
    ]
    for r, method, ratio, match in cases:
        with pytest.raises(ValueError, match=match):
            resolve_r(model, r, method, ratio)


def test_set_r_refusal_leaves_the_model_unchanged():
    model = tocom_hub.patch(make_vit("cls_token"))
    tocom_hub.set_r(model, [2, 3, 4])
    h = state_hash(model)
    for bad in (33, [1, 2], [1, 2, -3], 1.0, True, "4"):
        with pytest.raises(ValueError, match="^r"):
            tocom_hub.set_r(model, bad)
        assert tocom_hub.get_r(model) == [2, 3, 4] and state_hash(model) == h
    tocom_hub.set_r(model, np.int64(5))
    assert tocom_hub.get_r(model) == 5 and type(tocom_hub.get_r(model)) is int


def test_bank_and_compensation_share_the_rule():
    model = make_vit("cls_token")
    bank = ToComBank.for_model(model, r_max=5)
    with pytest.raises(ValueError, match=r"^target r must be an int in \[0, 5\] \(the bank's range\); got 6$"):
        bank.delta(0, "q", 0, 6)
    tocom_hub.apply(model, 0, 3, bank=bank)
    h, state = state_hash(model), compensate.get_compensation(model)
    for bad in (6, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"^target_r must be an int in \[0, 5\] \(the bank's range\)"):
            tocom_hub.set_target_r(model, bad)
        assert state_hash(model) == h and compensate.get_compensation(model) is state and tocom_hub.get_r(model) == 3
    tocom_hub.set_target_r(model, np.int64(4))
    assert tocom_hub.get_r(model) == 4 and state.target_r == 4 and type(state.target_r) is int

"""The Compensation base (core/compensation/base.py): where the bank's targets live in a timm ViT."""

from __future__ import annotations

import pytest
import torch
from bank_helpers import weight_rows
from compensate_helpers import bank_for, fresh

import tocom_hub
from tocom_hub import compensate
from tocom_hub.core.compensation.base import Compensation, bank_layout
from tocom_hub.core.compensation.hooked import HookedCompensation
from tocom_hub.core.compensation.merged import MergedCompensation


@pytest.mark.parametrize("targets", [("q", "v"), ("v",), ("k", "proj"), ("q", "k", "v", "proj")])
def test_bank_layout_names_the_rows_each_target_adapts(targets):
    model = fresh()
    bank, _ = bank_for(model, targets=targets)
    layout = bank_layout(model, bank)
    seen = set()
    for b, module, entries in layout:
        attn = model.blocks[b].attn
        assert module is (attn.proj if entries[0][0] == "proj" else attn.qkv)
        for t, start, stop in entries:
            # the rows are the reference's rows of that target (timm stacks q, k, v in attn.qkv)
            assert torch.equal(module.weight.detach()[start:stop], weight_rows(model, b, t))
            assert stop - start == (module.out_features if t == "proj" else module.out_features // 3)
            seen.add((b, t))
    assert seen == {(b, t) for b in range(len(model.blocks)) for t in targets}
    linears_per_block = ("proj" in targets) + any(t != "proj" for t in targets)
    assert len(layout) == len(model.blocks) * linears_per_block  # one entry per adapted Linear


@pytest.mark.parametrize("merge, cls", [(True, MergedCompensation), (False, HookedCompensation)])
def test_get_state_is_a_compensation_of_the_mode(merge, cls):
    model = fresh()
    bank, _ = bank_for(model)
    tocom_hub.apply(model, 1, 4, bank=bank, merge=merge, scale=0.05)
    st = compensate.get_compensation(model)
    assert isinstance(st, Compensation) and type(st) is cls
    assert (st.bank, st.source_r, st.target_r, st.scale, st.merge, st.enabled) == (bank, 1, 4, 0.05, merge, True)
    assert repr(st) == f"Compensation(source_r=1, target_r=4, scale=0.05, merge={merge}, targets=('q', 'v'))"

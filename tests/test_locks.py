"""The switch lock (core/compensation/locks.py): switches, applies and removes from several threads leave the
model exact."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from bank_helpers import clone_state
from compensate_helpers import assert_closed_form, bank_for, fresh

import tocom_hub
from tocom_hub import compensate


@pytest.mark.usefixtures("one_thread")
def test_concurrent_switches_keep_the_closed_form(monkeypatch):
    """4 threads switch one merged model at random; the weights always end at W₀ + Δ(source → target)
    of the last switch, the patcher's r agrees, and remove() still restores the original bit-exact.

    The periodic exact re-derivation is switched off so that a lost or doubled update cannot be
    healed by a later resync: what remains is the rounding of ~1,600 in-place updates (≈1e-5)."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(compensate, "RESYNC_EVERY", 10**9)
    model = fresh(depth=2)
    original = clone_state(model)
    bank, groups = bank_for(model, r_max=8)
    source = 3
    tocom_hub.apply(model, source, 0, bank=bank)
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over as often as possible

    def hammer(seed):
        rng = random.Random(seed)
        for _ in range(400):
            tocom_hub.set_target_r(model, rng.choice([0, 1, 2, 4, 5, 6, 7, 8]))  # never the source

    try:
        for trial in range(2):
            with ThreadPoolExecutor(max_workers=4) as pool:
                for future in [pool.submit(hammer, 10 * trial + k) for k in range(4)]:
                    future.result()  # re-raises what a thread raised
            st = compensate.get_compensation(model)
            assert tocom_hub.get_r(model) == st.target_r
            assert_closed_form(model, original, groups, bank, source, st.target_r, tol=1e-4)
    finally:
        sys.setswitchinterval(old_interval)
    tocom_hub.remove(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_switch_lock_serialises_a_forward_with_a_switch():
    """A forward holding switch_lock(model) sees one consistent r; a switch from another thread waits."""
    import threading

    model = fresh(depth=2)
    bank, _ = bank_for(model)
    tocom_hub.apply(model, 0, 2, bank=bank)
    lock = compensate.switch_lock(model)
    assert lock is compensate.switch_lock(model)
    done = threading.Event()
    with lock:
        th = threading.Thread(target=lambda: (tocom_hub.set_target_r(model, 5), done.set()))
        th.start()
        assert not done.wait(0.2)  # blocked while we hold the lock
        assert compensate.get_compensation(model).target_r == 2
    th.join()
    assert done.is_set() and compensate.get_compensation(model).target_r == 5
    clone = copy.deepcopy(model)  # the lock is not shared with (nor copied into) a deepcopy
    assert compensate.switch_lock(clone) is not lock


@pytest.mark.usefixtures("one_thread")
def test_concurrent_apply_switch_and_remove_keep_the_model_consistent():
    """Threads apply (two banks, various pairs), switch and remove at random: whatever state the
    model ends in is exact — the closed form of the bank it carries, or the original weights."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    model = fresh(depth=2)
    original = clone_state(model)
    banks = [bank_for(model, r_max=6, seed=s) for s in (1, 2)]
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(150):
            op = rng.random()
            try:
                if op < 0.2:
                    bank, _ = banks[rng.randrange(2)]
                    tocom_hub.apply(model, rng.randint(0, 6), rng.randint(0, 6), bank=bank)
                elif op < 0.3:
                    tocom_hub.remove(model)
                else:
                    tocom_hub.set_target_r(model, rng.randint(0, 6))
            except ValueError as e:  # set_target_r on a model whose bank another thread just removed
                assert "carries no ToCom bank" in str(e)

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            for future in [pool.submit(worker, k) for k in range(4)]:
                future.result()
    finally:
        sys.setswitchinterval(old_interval)
    st = compensate.get_compensation(model)
    if st is not None:
        bank, groups = next(bg for bg in banks if bg[0] is st.bank)
        assert tocom_hub.get_r(model) == st.target_r
        assert_closed_form(model, original, groups, bank, st.source_r, st.target_r)
    tocom_hub.remove(model)
    assert not tocom_hub.is_patched(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())

"""The timing harness on a fake clock: deterministic costs, orders, paired ratios, the noise flag."""

from __future__ import annotations

import pytest

from tocom_hub.tools.timing import (
    NOISY_SPREAD,
    Stopwatch,
    WallTimer,
    interleaved,
    is_noisy,
    paired_ratios,
    percentile,
    ratio_summary,
    round_orders,
)


class FakeClock:
    """Seconds that move only when a fake callable 'runs'."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def cost(self, seconds: float, log=None, name=None):
        def run():
            self.now += seconds
            if log is not None:
                log.append(name)

        return run


def test_wall_timer_measures_the_injected_clock_per_call():
    clock, synced = FakeClock(), []
    timer = WallTimer(clock, sync=lambda: synced.append(clock.now))
    assert timer.ms(clock.cost(0.002), iters=5) == pytest.approx(2.0)
    assert synced == [0.0, 0.010]  # before starting and before stopping
    out, ms = timer.timed(lambda: (clock.cost(0.003)(), "out")[1])
    assert out == "out" and ms == pytest.approx(3.0)


def test_stopwatch_laps():
    clock = FakeClock()
    watch = Stopwatch(clock)
    clock.cost(0.004)()
    assert watch.lap() == pytest.approx(4.0)
    clock.cost(0.001)()
    assert watch.lap() == pytest.approx(1.0)


def test_paired_ratio_of_two_known_costs_with_a_drift():
    """B costs half of A; the machine slows down 10x half-way: the paired ratio is still exactly 2."""
    clock = FakeClock()
    load = {"factor": 1.0}
    calls = {"n": 0}

    def runner(seconds):
        def run():
            calls["n"] += 1
            if calls["n"] == 21:
                load["factor"] = 10.0
            clock.now += seconds * load["factor"]

        return run

    ms = interleaved({"A": runner(0.004), "B": runner(0.002)}, rounds=20, timer=WallTimer(clock), seed=3)
    assert len(ms["A"]) == len(ms["B"]) == 20
    ratios = paired_ratios(ms["A"], ms["B"])
    # the load changes between rounds (call 21 opens round 11): every paired ratio is exactly 2
    assert ratios == pytest.approx([2.0] * 20)
    assert ratio_summary(ratios)["median"] == pytest.approx(2.0)
    assert max(ms["A"]) / min(ms["A"]) == pytest.approx(10.0)  # the unpaired times moved 10x


def test_interleaving_orders_before_settle_and_samples():
    clock, log, seen = FakeClock(), [], []
    runners = {k: clock.cost(0.001, log, k) for k in "ABC"}
    interleaved(runners, 3, timer=WallTimer(clock), order="alternate", before=log.append, settle=1)
    # before(k), one untimed call, then the timed call, per key; rounds A B C / C B A / A B C
    assert "".join(log) == "AAABBBCCC" + "CCCBBBAAA" + "AAABBBCCC"
    shuffled = list(round_orders(list("ABCD"), 50, "shuffle", seed=1))
    assert all(sorted(o) == list("ABCD") for o in shuffled) and len({tuple(o) for o in shuffled}) > 5
    assert shuffled == list(round_orders(list("ABCD"), 50, "shuffle", seed=1))  # seeded
    assert list(round_orders("AB", 3, "fixed")) == [["A", "B"]] * 3
    interleaved(runners, 2, timer=WallTimer(clock), on_sample=lambda k, ms: seen.append((k, ms)))
    assert sorted(k for k, _ in seen) == list("AABBCC") and all(ms == pytest.approx(1.0) for _, ms in seen)
    with pytest.raises(ValueError, match="order"):
        list(round_orders("AB", 1, "random"))
    with pytest.raises(ValueError, match="rounds"):
        interleaved(runners, 0)


def test_percentile_noise_flag_and_ratio_lengths():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 90) == 5
    with pytest.raises(ValueError):
        percentile([], 50)
    steady = [2.0] * 9 + [2.1]
    assert not is_noisy(steady)
    wide = [1.0, 1.5, 2.0, 2.5, 3.0]  # p10-p90 = 1.6 > 0.25 * 2
    assert is_noisy(wide) and ratio_summary(wide)["noisy"]
    assert not is_noisy(wide, spread=1.0) and NOISY_SPREAD == 0.25
    with pytest.raises(ValueError, match="as many rounds"):
        paired_ratios([1.0, 2.0], [1.0])


def test_trainer_step_timer_on_the_injected_clock():
    import torch

    from tocom_hub.training.metrics import StepTimer, step_metrics

    clock = FakeClock()
    timer = StepTimer(torch.device("cpu"), clock=clock)
    for seconds in (5.0, 0.5, 0.5, 0.7):  # the first step warms the loader up: left out
        clock.cost(seconds)()
        timer.tick()
    assert timer.median() == pytest.approx(0.5) and timer.window_seconds() == pytest.approx(1.7)
    got = step_metrics(timer, timer.window_seconds(), images_per_step=8)
    assert got["images_per_second"] == pytest.approx(16.0)
    assert got["throughput_images_per_second"] == pytest.approx(3 * 8 / 1.7)

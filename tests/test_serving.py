"""The serving engine without Ray: concurrent batches (and r switches between them) give the serial
outputs, r moves only between batches and with the queueing latency, bad bodies get a 4xx reason."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from serve_helpers import indices, png, poison_png, poisoned_demo, probs

import tocom_hub
from tocom_hub.serving.config import ServeConfig, load_served_model
from tocom_hub.serving.engine import BadRequest, ServeEngine

CURVE = {r: 10.0 - 0.25 * r for r in range(17)}  # a fake calibration: 10 ms at r = 0 ... 6 ms at r = 16


@pytest.fixture(scope="module")
def engine():
    return ServeEngine(ServeConfig(model="demo", fixed_r=0, max_batch_size=4, budget_ms=50))


@pytest.fixture(scope="module")
def images(engine):
    return [engine.decode(png(i), "image/png") for i in range(12)]


def _reference(images, r):
    """A fresh model, apply(0 -> r) with the demo bank, one forward per image (serial, independent)."""
    from tocom_hub.demo import demo_bank_path, demo_info, load_demo_model

    model = load_demo_model(0).model
    tocom_hub.patch(model, method="tome")
    tocom_hub.apply(model, 0, r, bank=demo_bank_path(), scale=demo_info()["scale"]["0"])
    with torch.inference_mode():
        return torch.cat([model(x[None]).softmax(-1) for x in images])


@pytest.mark.parametrize("r", [0, 8, 16])
def test_predict_equals_a_fresh_bank_applied_model(engine, images, r):
    engine.set_fixed_r(r)
    out, used = engine.predict(images[:4])
    assert used == r
    ref = _reference(images[:4], r)
    top = ref.topk(5, dim=-1)
    assert indices(out) == [sorted(i) for i in top.indices.tolist()]
    torch.testing.assert_close(probs(out), ref.gather(-1, torch.tensor(indices(out))), atol=1e-5, rtol=0)


def test_r_changes_the_answer(engine, images):
    # the comparison above could not fail if r did nothing
    engine.set_fixed_r(0)
    a, _ = engine.predict(images[:4])
    engine.set_fixed_r(16)
    b, _ = engine.predict(images[:4])
    assert (probs(a) - probs(b)).abs().max() > 1e-3


def test_concurrent_batches_and_switches_give_the_serial_outputs(engine, images):
    serial = {}
    for r in (0, 4, 16):
        engine.set_fixed_r(r)
        serial[r] = [engine.predict(images[i : i + 3])[0] for i in range(0, 12, 3)]
    got, errors = [], []
    go = threading.Barrier(4)

    def client(k):
        try:
            go.wait()
            for _ in range(5):
                for i in range(0, 12, 3):
                    out, r = engine.predict(images[i : i + 3])
                    got.append((r, i, out))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def switcher():
        try:
            go.wait()
            for r in (4, 16, 0, 4, 16, 0, 4, 16):
                engine.set_fixed_r(r)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)] + [threading.Thread(target=switcher)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(got) == 60 and {r for r, _, _ in got} <= {0, 4, 16}
    for r, i, out in got:
        torch.testing.assert_close(probs(out), probs(serial[r][i // 3]), atol=1e-6, rtol=0)


def test_adaptive_r_follows_the_queueing_latency_between_batches(images):
    cfg = ServeConfig(model="demo", budget_ms=20, control_fraction=0.5, max_batch_size=4, window=3, patience_down=2)
    ticks = iter(range(10**6))
    clock = lambda: next(ticks) * 0.002  # noqa: E731 - every reading 2 ms later: a forward "takes" 2 ms
    eng = ServeEngine(cfg, served=load_served_model(cfg), calibration=CURVE, clock=clock)
    assert eng.adaptive and eng.r == 4  # smallest r with 10 - r/4 <= 0.9 * (0.5 * 20)
    seen = []
    for _ in range(4):  # each request waited 50 ms in the queue: over budget -> up to the largest r
        now = eng.clock()
        _, r = eng.predict(images[:4], arrivals=[now - 0.05] * 4)
        seen.append(r)
    assert seen[0] == 4 and eng.r == 16
    for _ in range(8):  # the queue drained: back down after patience_down batches
        _, r = eng.predict(images[:1])
        seen.append(r)
    assert eng.r == 0, eng.controller.history  # 2 ms measured / 6 ms expected: factor 1/3, r = 0 fits again
    assert eng.metrics.snapshot()["requests"] == 24
    assert [b["r"] for b in eng.metrics.snapshot(last=None)["batches"]] == seen


def test_set_fixed_r_validates_first(engine):
    engine.set_fixed_r(4)
    for bad in (17, -1, 2.5, "8"):
        with pytest.raises(ValueError, match="served r values"):
            engine.set_fixed_r(bad)
    assert engine.r == 4 and not engine.adaptive


@pytest.mark.parametrize(
    "body, ctype, status, reason",
    [
        (png(0), "text/plain", 415, "content type"),
        (png(0), None, 415, "content type"),
        (b"", "image/png", 400, "empty body"),
        (b"not an image at all", "image/jpeg", 400, "not a readable image"),
        (png(0)[:40], "image/png", 400, "not a readable image"),
        (b"x" * 5000, "application/octet-stream", 413, "exceeds the limit of 4096"),
        (png(0, size=70), "image/png", 413, "exceeds the limit of 4096"),
    ],
)
def test_bad_bodies_get_a_4xx_reason(small_limits, body, ctype, status, reason):
    with pytest.raises(BadRequest, match=reason) as info:
        small_limits.decode(body, ctype)
    assert info.value.status == status and "\n" not in info.value.reason


@pytest.fixture(scope="module")
def small_limits():
    return ServeEngine(ServeConfig(model="demo", fixed_r=0, max_bytes=4096, max_pixels=4096))


def test_a_failing_forward_raises_and_the_next_batch_is_served(images):
    cfg = ServeConfig(model=poisoned_demo, fixed_r=8, source_r=0)
    eng = ServeEngine(cfg)
    poison = eng.decode(poison_png(), "image/png")
    with pytest.raises(RuntimeError, match="poisoned"):
        eng.predict([images[0], poison])
    out, r = eng.predict(images[:2])
    assert r == 8 and len(out) == 2


def test_config_rejects_bad_settings_with_one_line():
    for kwargs, match in [
        ({"budget_ms": 0}, "budget_ms"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"fixed_r": -2}, "fixed_r"),
        ({"method": "nope"}, "method"),
        ({"control_fraction": 0}, "control_fraction"),
        ({"bank": "x", "no_bank": True}, "contradict"),
    ]:
        with pytest.raises(ValueError, match=match):
            ServeConfig(**kwargs)


def test_a_timm_name_with_a_bank_folder_is_served(tmp_path):
    """The non-demo path: a timm name (+ model_kwargs) and a saved bank folder, served at a fixed r, equal a
    fresh model with the same weights and apply(0 -> r)."""
    import timm

    from tocom_hub.core.bank.module import ToComBank

    kwargs = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=7)
    cfg = ServeConfig(model="vit_tiny_patch16_224", model_kwargs=kwargs, bank=str(tmp_path / "bank"), fixed_r=3)
    bank = ToComBank.for_model(timm.create_model("vit_tiny_patch16_224", **kwargs), r_max=4, rank=2)
    with torch.no_grad():
        for p in bank.lora_B.values():
            p.normal_(0, 0.5)
    bank.save_pretrained(cfg.bank)
    served = load_served_model(cfg)
    reference = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()
    reference.load_state_dict(served.model.state_dict())
    eng = ServeEngine(cfg, served=served)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out, r = eng.predict(list(x))
    info = eng.describe()
    assert r == 3 and info["r_values"] == [0, 1, 2, 3, 4] and info["config"]["model_kwargs"] == kwargs
    json.dumps(info)  # /info sends it as JSON
    tocom_hub.patch(reference)
    tocom_hub.apply(reference, 0, 3, bank=ToComBank.from_pretrained(cfg.bank))
    with torch.inference_mode():
        want = reference(x).softmax(-1)
    torch.testing.assert_close(probs(out), want.gather(-1, torch.tensor(indices(out))), atol=1e-5, rtol=0)
    tocom_hub.set_target_r(reference, 0)  # the comparison can fail: r = 0 answers otherwise
    with torch.inference_mode():
        assert (reference(x).softmax(-1) - want).abs().max() > 1e-4


def test_ray_is_imported_only_by_the_app_module():
    """``import tocom_hub`` and the serving engine need no Ray (serving is an optional layer); the CLI's
    ``serve`` refuses a bad setting with one line before Ray starts."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, tocom_hub, tocom_hub.serving, tocom_hub.serving.engine, tocom_hub.serving.config; "
        "from tocom_hub.cli import build_parser, main; build_parser().format_help(); "
        "assert main(['serve', '--model', 'demo', '--budget-ms', '0']) == 1; "
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "serve: error: budget_ms must be a positive number" in proc.stderr

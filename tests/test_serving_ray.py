"""The Ray Serve deployment over real HTTP on loopback (slow: a local Ray instance each).

``tocom-hub serve --model demo`` in a subprocess, and an in-process ``ray.init(num_cpus=2)`` deployment of the
demo model (with a poisoned input for the 5xx path): answers equal an in-process forward at the r the
response reports, under concurrent load too; bad input gets a 4xx, a failing forward a 500, and the replica
keeps serving."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from serve_helpers import indices, png, poison_png, poisoned_demo, probs  # noqa: E402

from tocom_hub.serving.config import ServeConfig  # noqa: E402
from tocom_hub.serving.engine import ServeEngine  # noqa: E402

pytestmark = pytest.mark.slow
IMAGES = [png(i) for i in range(16)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_against(reference: ServeEngine, body: bytes, response) -> int:
    """``response`` answers ``body`` as ``reference`` does at the r the response reports; returns that r."""
    assert response.status_code == 200, response.text
    got = response.json()
    r = int(response.headers["x-tocom-r"])
    assert got["r"] == r and float(response.headers["x-tocom-latency-ms"]) >= 0
    reference.set_fixed_r(r)
    want, _ = reference.predict([reference.decode(body, "image/png")])
    assert indices([got]) == indices(want)
    torch.testing.assert_close(probs([got]), probs(want), atol=1e-5, rtol=0)
    return r


def _post(client, url, body, ctype="image/png"):
    return client.post(url, content=body, headers={"content-type": ctype})


def test_the_cli_serves_the_demo_on_loopback_and_stops_on_sigint():
    port = _free_port()
    cmd = [sys.executable, "-m", "tocom_hub", "serve", "--model", "demo", "--num-cpus", "2", "--port", str(port)]
    cmd += ["--fixed-r", "8", "--duration", "120"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    lines = []
    try:
        deadline = time.monotonic() + 90
        for line in proc.stdout:  # "serving demo at http://127.0.0.1:PORT/ ..." once the replica is ready
            lines.append(line)
            if line.startswith("serving demo at"):
                break
            assert time.monotonic() < deadline, "".join(lines[-20:])
        assert lines and lines[-1].startswith(f"serving demo at http://127.0.0.1:{port}/"), "".join(lines[-20:])
        ref = ServeEngine(ServeConfig(model="demo", fixed_r=0))
        with httpx.Client(timeout=30) as client:
            url = f"http://127.0.0.1:{port}/"
            assert _check_against(ref, IMAGES[0], _post(client, url, IMAGES[0])) == 8
            assert client.post(url + "r", json={"r": 16}).json() == {"r": 16, "mode": "fixed"}
            assert _check_against(ref, IMAGES[1], _post(client, url, IMAGES[1])) == 16
            info = client.get(url + "info").json()
            assert info["model"] == "demo" and info["bank"] and info["r"] == 16
        # Serve binds loopback only: no other address of this host answers
        listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout if _has_ss() else ""
        assert f"0.0.0.0:{port}" not in listening and f"*:{port}" not in listening
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, _ = proc.communicate()
    assert proc.returncode in (130, 0), "".join(lines[-10:]) + rest[-2000:]


def _has_ss() -> bool:
    from shutil import which

    return which("ss") is not None


@pytest.fixture(scope="module")
def served():
    import ray
    import serve_helpers
    from ray import cloudpickle, serve

    from tocom_hub.demo import demo_bank_path, demo_info
    from tocom_hub.serving.app import build_app

    cloudpickle.register_pickle_by_value(serve_helpers)  # the replica cannot import the tests folder
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = ServeConfig(
            model=poisoned_demo,
            bank=demo_bank_path(),
            source_r=0,
            scale=demo_info()["scale"]["0"],
            crop_pct=1.0,
            fixed_r=4,
            max_batch_size=8,
            batch_wait_timeout_s=0.02,
            budget_ms=30,
        )
        serve.run(build_app(cfg), name="tocom", route_prefix="/")
        yield f"http://127.0.0.1:{port}/", ServeEngine(cfg)
    finally:
        serve.shutdown()
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(serve_helpers)


def test_concurrent_requests_get_the_serial_answers(served):
    url, ref = served
    results, errors = [], []
    go = threading.Barrier(8)

    def client(k):
        try:
            with httpx.Client(timeout=60) as c:
                go.wait()
                for i in range(k, len(IMAGES) * 3, 8):
                    body = IMAGES[i % len(IMAGES)]
                    results.append((body, _post(c, url, body)))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 48, errors
    assert {_check_against(ref, body, resp) for body, resp in results} == {4}
    with httpx.Client(timeout=30) as c:
        metrics = c.get(url + "metrics").json()
    assert metrics["requests"] >= 48 and metrics["in_flight"] == 0
    assert max(b["size"] for b in metrics["batches"]) > 1  # the requests were batched
    assert set(metrics["latency_ms"]) == {"p50", "p90", "p99", "max"}


def test_adaptive_r_answers_at_the_reported_r(served):
    url, ref = served
    with httpx.Client(timeout=60) as c:
        assert c.post(url + "r", json={"r": None}).json()["mode"] == "adaptive"  # calibrates in the replica
        seen = {_check_against(ref, body, _post(c, url, body)) for body in IMAGES[:6]}
        assert seen <= set(range(17))
        assert c.post(url + "r", json={"r": 4}).json() == {"r": 4, "mode": "fixed"}


@pytest.mark.parametrize(
    "body, ctype, status, reason",
    [
        (b"hello", "text/plain", 415, "content type"),
        (b"definitely not a png", "image/png", 400, "not a readable image"),
        (b"", "image/png", 400, "empty body"),
        (b"\0" * (4 * 1024 * 1024 + 1), "application/octet-stream", 413, "exceeds the limit"),
    ],
)
def test_bad_input_gets_a_4xx_and_the_next_request_is_served(served, body, ctype, status, reason):
    url, ref = served
    with httpx.Client(timeout=60) as c:
        bad = _post(c, url, body, ctype)
        assert bad.status_code == status and reason in bad.json()["error"]
        _check_against(ref, IMAGES[2], _post(c, url, IMAGES[2]))


def test_a_client_closing_mid_body_does_not_stop_the_replica(served):
    url, ref = served
    port = int(url.rsplit(":", 1)[1].strip("/"))
    with socket.create_connection(("127.0.0.1", port)) as s:
        head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
        s.sendall(head + b"\x89PNG")  # 4 of the 100000 bytes, then the connection closes
    with httpx.Client(timeout=60) as c:
        _check_against(ref, IMAGES[3], _post(c, url, IMAGES[3]))
        assert c.post(url + "r", content=b"{not json").status_code == 400
        assert c.post(url + "r", json={"r": 99}).status_code == 400


def test_a_failing_model_call_is_a_500_and_the_next_request_is_served(served):
    url, ref = served
    with httpx.Client(timeout=60) as c:
        failed = _post(c, url, poison_png())
        assert failed.status_code == 500 and "poisoned input" in failed.json()["error"]
        _check_against(ref, IMAGES[4], _post(c, url, IMAGES[4]))
        assert c.get(url + "metrics").json()["errors"]["5xx"] >= 1
        assert json.loads(c.get(url + "nowhere").text)["error"].startswith("no route")

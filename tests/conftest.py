"""Shared pytest configuration.

Hub isolation (must run before anything imports ``huggingface_hub``, which reads its env at import):
``HF_ENDPOINT`` points at a port reserved for the test Hub server (see ``tests/hub_server.py``),
``HF_HOME`` at a throw-away folder, and tokens/telemetry are disabled, so no test can reach the
real Hub or touch ``~/.cache/huggingface``.
"""

import os
import socket
import sys
import tempfile
import warnings


def _reserve_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if "huggingface_hub" in sys.modules:  # pragma: no cover - env below would be ignored
    warnings.warn(
        "huggingface_hub was imported before tests/conftest.py: HF_ENDPOINT isolation is not active", stacklevel=1
    )
for _var in [v for v in os.environ if v.startswith(("HF_", "HUGGINGFACE_"))] + ["TRANSFORMERS_OFFLINE"]:
    os.environ.pop(_var, None)
HUB_TEST_PORT = _reserve_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_TEST_PORT}"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="tocom-hub-tests-hf-home-")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_HUB_DISABLE_UPDATE_CHECK"] = "1"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import contextlib  # noqa: E402
import shutil  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hub_server import HubClient, HubServer  # noqa: E402


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ.get("HF_HOME", ""), ignore_errors=True)


@pytest.fixture(scope="session")
def _hub_server_session() -> Iterator[HubServer]:
    server = HubServer(port=HUB_TEST_PORT)
    try:
        server.start()
    except OSError:  # reserved port got taken: subprocess clients still work, in-process ones won't
        warnings.warn(
            f"port {HUB_TEST_PORT} unavailable; in-process huggingface_hub won't reach the test Hub", stacklevel=1
        )
        server = HubServer().start()
    yield server
    server.stop()


@pytest.fixture
def hub_server(_hub_server_session: HubServer) -> Iterator[HubServer]:
    """A running, empty test Hub at ``hub_server.url`` (== ``HF_ENDPOINT`` of this pytest process).

    Seed it with ``add_repo``/``commit``/``tag``; ``stop()``/``start()`` to simulate an outage.
    """
    server = _hub_server_session
    server.reset()
    server.start()
    yield server
    server.start()  # a test may have stopped it
    server.reset()


@pytest.fixture
def hub_client(hub_server: HubServer, tmp_path) -> HubClient:
    """Runs client code in subprocesses against ``hub_server`` with a per-test ``HF_HOME``."""
    return HubClient(hub_server, tmp_path / "hf_home")


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Tiny matmuls: one thread avoids OpenMP hand-offs that dominate on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for this test."""
    with _one_torch_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """One torch thread for the whole test module (``pytestmark = pytest.mark.usefixtures(...)``)."""
    with _one_torch_thread():
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tools' and CLI's inputs (tool_helpers.make_files): a saved tiny model (timm's config.json +
    model.safetensors), a bank, an ImageFolder, an image; one set per test module."""
    from tool_helpers import make_files

    return make_files(tmp_path_factory.mktemp("tools"))

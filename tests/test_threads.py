"""tocom_hub.training.threads: CPU threads under ``accelerate launch``."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.py: one torch thread for the module


def test_training_threads_under_accelerate_launch(monkeypatch):
    """accelerate launch exports OMP_NUM_THREADS=1 on a CPU machine: the training scripts take the cores back
    (split between the local processes), TOCOM_HUB_CPU_THREADS overrides, anything else is left alone."""
    from tocom_hub.training.threads import available_cpus, setup_cpu_threads

    old = torch.get_num_threads()
    said = []
    try:
        names = [v for v in os.environ if v.startswith("ACCELERATE_")] + ["LOCAL_WORLD_SIZE", "TOCOM_HUB_CPU_THREADS"]
        for var in names:
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert setup_cpu_threads("cpu", log=said.append) is None and torch.get_num_threads() == 1  # plain python
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what accelerate launch exports
        assert setup_cpu_threads("cuda", log=said.append) is None and torch.get_num_threads() == 1
        monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))  # an idle machine: every core
        assert setup_cpu_threads("cpu", log=said.append) == available_cpus() == torch.get_num_threads()
        assert (len(said) == 1 and "OMP_NUM_THREADS=1" in said[0]) or available_cpus() == 1
        torch.set_num_threads(1)
        said.clear()
        monkeypatch.setattr(os, "getloadavg", lambda: (float(available_cpus()), 0.0, 0.0))  # busy: keep 1
        assert setup_cpu_threads("cpu", log=said.append) == 1 == torch.get_num_threads()
        assert (len(said) == 1 and "busy" in said[0]) or available_cpus() == 1
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(available_cpus()))  # one core per process: nothing to gain
        assert setup_cpu_threads("cpu", log=said.append) == 1
        monkeypatch.setenv("TOCOM_HUB_CPU_THREADS", "3")
        assert setup_cpu_threads("cpu", log=said.append) == 3 == torch.get_num_threads()
        monkeypatch.setenv("TOCOM_HUB_CPU_THREADS", "zero")
        with pytest.raises(ValueError, match="TOCOM_HUB_CPU_THREADS must be a positive integer"):
            setup_cpu_threads("cpu")
    finally:
        torch.set_num_threads(old)

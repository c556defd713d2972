"""How many CPU threads torch should use for a training run started by ``accelerate launch``.

``accelerate launch`` exports ``OMP_NUM_THREADS=1`` on a CPU-only machine whose physical core count per
process is 1 (2 logical cores, say), so a training script launched that way would use one core of
several. :func:`setup_cpu_threads` undoes that at start-up (the available cores, split between the
processes on this machine, as far as other jobs leave them idle) and says so once;
``TOCOM_HUB_CPU_THREADS=N`` picks ``N`` instead.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

__all__ = ["available_cpus", "setup_cpu_threads"]

ENV = "TOCOM_HUB_CPU_THREADS"


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def setup_cpu_threads(device_type: str = "cpu", local_processes: Optional[int] = None, *, log=None) -> Optional[int]:
    """Set torch's intra-op threads for a training run on a CPU; returns the number set (``None``: untouched).

    * ``TOCOM_HUB_CPU_THREADS=N`` → ``N``.
    * launched by ``accelerate launch`` (which exports ``OMP_NUM_THREADS=1`` on such machines) on a CPU →
      the available cores divided by ``local_processes`` (default: ``$LOCAL_WORLD_SIZE``, else 1), but no
      more than the cores other jobs leave idle (1-minute load average), with one line saying so. On a
      shared 2-core machine at load ≈ 6, 2 threads took 6.8–9.9 s per distillation step and 1 thread
      1.5–1.8 s: a thread that waits for a busy core stalls every parallel operation.
    * otherwise (``python script.py``, torchrun, an ``OMP_NUM_THREADS`` of your own, a GPU) → untouched.
    """
    import torch

    say = log or (lambda msg: print(msg, file=sys.stderr))
    wanted = os.environ.get(ENV, "").strip()
    if wanted:
        try:
            n = int(wanted)
        except ValueError:
            raise ValueError(f"{ENV} must be a positive integer; got {wanted!r}") from None
        if n < 1:
            raise ValueError(f"{ENV} must be a positive integer; got {wanted!r}")
        torch.set_num_threads(n)
        return n
    launched_by_accelerate = any(k.startswith("ACCELERATE_") for k in os.environ)
    if device_type != "cpu" or not launched_by_accelerate or os.environ.get("OMP_NUM_THREADS") != "1":
        return None
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    cpus = available_cpus()
    share = max(1, cpus // max(1, local_processes))
    load = _load_average()
    idle = max(1, int(cpus - load + 0.5)) if load is not None else cpus
    n = min(share, max(1, idle // max(1, local_processes)))
    if n > torch.get_num_threads():
        torch.set_num_threads(n)
        say(
            f"accelerate launch set OMP_NUM_THREADS=1; using {n} CPU threads per process ({cpus} cores, "
            f"{local_processes} process(es) here); set {ENV}=N to choose"
        )
    elif share > n:
        say(
            f"accelerate launch set OMP_NUM_THREADS=1; keeping {n} CPU thread(s) per process: the machine is busy "
            f"(load average {load:.1f} on {cpus} cores), and threads waiting for busy cores make every step slower; "
            f"set {ENV}={share} to use them anyway"
        )
    return torch.get_num_threads()


def _load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not Unix
        return None

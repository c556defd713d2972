"""What keeps a training run's output safe: one run per output dir, and SIGTERM → a resumable checkpoint.

:class:`RunGuard` is made once per run by ``distill.py`` / ``finetune.py``:

* :meth:`RunGuard.lock` takes ``OUTPUT_DIR/.tocom-run.lock`` (a ``filelock.FileLock``; the OS drops it when
  the process dies, however it dies). Only the main process (global rank 0) takes it; every other process
  learns the outcome through one broadcast, so under ``torchrun`` / ``accelerate launch`` either all
  processes run or all stop. A second run on a locked dir stops before it reads or writes anything there,
  with :class:`OutputDirBusy` (one line: who holds it, since when).
* :meth:`RunGuard.watch` installs a SIGTERM handler that only sets a flag; :meth:`RunGuard.preempted`, called
  at every optimizer-step boundary, says whether any process got the signal (one all-reduce of one number
  when there are several), so all of them checkpoint the same step and stop together.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any, Optional

from tocom_hub.core.jsonio import write_json

__all__ = ["LOCK_NAME", "OutputDirBusy", "RunGuard"]

LOCK_NAME = ".tocom-run.lock"
HOLDER_NAME = ".tocom-run.json"  # who holds the lock (for the refusal message); advisory only


class OutputDirBusy(RuntimeError):
    """Another run holds the output directory's lock (the scripts print the message and exit 1)."""


class RunGuard:
    """The lock on one output directory and the SIGTERM flag of one run (see the module docstring)."""

    def __init__(self, output_dir: str, script: str) -> None:
        self.output_dir, self.script = Path(output_dir), script
        self.signalled: Optional[str] = None  # "SIGTERM" once any process got it (after preempted())
        self._lock = None
        self._got = False
        self._previous: Any = None

    # -- one run per output dir ---------------------------------------------------------------------
    def lock(self, accelerator) -> "RunGuard":
        """Take the output dir's lock (main process), or raise :class:`OutputDirBusy` on every process."""
        from accelerate.utils import broadcast_object_list

        problem = [None]
        if accelerator.is_main_process:
            problem[0] = self._acquire()
        if accelerator.num_processes > 1:
            broadcast_object_list(problem, from_process=0)
        if problem[0]:
            raise OutputDirBusy(problem[0])
        return self

    def _acquire(self) -> Optional[str]:
        from filelock import FileLock, Timeout

        self.output_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.output_dir / LOCK_NAME), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return (
                f"--output-dir {self.output_dir} is in use by another run ({self._holder()}); nothing was "
                f"read or written. Wait for it to finish, or pass another --output-dir"
            )
        self._lock = lock
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "script": self.script, "started": time.time()}
        try:
            write_json(self.output_dir / HOLDER_NAME, holder, indent=None)
        except OSError:
            pass  # the lock itself is what counts
        return None

    def _holder(self) -> str:
        try:
            h = json.loads((self.output_dir / HOLDER_NAME).read_text())
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(h["started"])))
            return f"{h['script']}, pid {int(h['pid'])} on {h['host']}, started {when}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    # -- SIGTERM -----------------------------------------------------------------------------------
    def watch(self) -> "RunGuard":
        """Let SIGTERM mean "checkpoint at the next step boundary and exit"; a second SIGTERM kills."""
        try:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread: keep the default behaviour
            self._previous = None
        return self

    def _on_sigterm(self, signum, frame) -> None:
        if self._got:  # the second one: do what it would have done without us
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        self._got = True

    def preempted(self, accelerator) -> bool:
        """``True`` (on every process) when any process got SIGTERM; call it at a step boundary."""
        got = self._got
        if accelerator.num_processes > 1:
            import torch

            flag = torch.tensor([1.0 if got else 0.0], device=accelerator.device)
            got = bool(accelerator.reduce(flag, "sum").item() > 0)
        if got:
            self.signalled = "SIGTERM"
        return got

    # -- end -----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Restore the SIGTERM handler and release the lock (idempotent)."""
        if self._previous is not None:
            try:
                signal.signal(signal.SIGTERM, self._previous)
            except ValueError:
                pass
            self._previous = None
        if self._lock is not None:
            try:
                (self.output_dir / HOLDER_NAME).unlink(missing_ok=True)
            except OSError:
                pass
            self._lock.release()
            self._lock = None

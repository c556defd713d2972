"""Serving a ToCom model under load (optional layer: ``pip install tocom-hub[serve]``).

:mod:`.config` (:class:`ServeConfig`, :func:`load_served_model`) and :mod:`.engine` (:class:`ServeEngine`:
decode, batch forward, ``r`` switched between batches by the latency controller) need no Ray;
:mod:`.app` is the Ray Serve deployment (``tocom_hub.serving.app.run(cfg)``, ``tocom-hub serve``).
Importing this package imports neither Ray nor torch. See docs/serving.md.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ServeConfig", "ServeEngine", "BadRequest", "load_served_model", "build_app", "run"]

_HOMES = {
    "ServeConfig": "config",
    "load_served_model": "config",
    "ServeEngine": "engine",
    "BadRequest": "engine",
    "build_app": "app",
    "run": "app",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

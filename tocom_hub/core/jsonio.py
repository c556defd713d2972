"""The one file writer of the project: :func:`atomic_write_bytes` (bank files, bank configs) and, on it,
:func:`write_json` (results, recipes, run records, tool side-files).

Both write to a temporary file beside the target, flush it to disk and move it into place with
:func:`os.replace`, so a reader never sees half a file and a failed write leaves the old file as it was.
:func:`canonical_dumps` is the compact, key-sorted form used where JSON
is hashed or embedded (markers, fingerprints, safetensors metadata).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

__all__ = ["atomic_write_bytes", "write_json", "canonical_dumps"]


def write_json(
    path: Union[str, os.PathLike],
    obj: Any,
    *,
    indent: Optional[int] = 2,
    sort_keys: bool = False,
    default: Optional[Callable[[Any], Any]] = str,
) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (temporary file + :func:`os.replace`); returns the path.

    The parent directory is created; the text is UTF-8 and ends with a newline. ``default`` (``str``)
    turns values JSON cannot hold (paths, dtypes, devices) into strings; pass ``None`` to raise instead.
    Nothing is left behind if serialisation fails (the target keeps its old content)::

        write_json("runs/a/result.json", {"r": 16, "img_per_s": 1234.5})
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default) + "\n"  # fails before any file
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Union[str, os.PathLike], data: bytes, *, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same directory, flushed and fsync'ed,
    given ``mode`` and moved over ``path`` with :func:`os.replace`. The parent directory is created; on any
    failure the temporary file is removed and ``path`` keeps its old content. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def canonical_dumps(obj: Any) -> str:
    """Compact, key-sorted JSON (``separators=(",", ":")``): equal objects give equal text, for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))

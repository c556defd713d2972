"""The one JSON writer of the project (results, recipes, run records, tool side-files).

:func:`write_json` creates the parent directory, writes UTF-8 to a temporary file beside the target and
moves it into place with :func:`os.replace`, so a reader never sees half a file and a failed write
leaves the old file as it was. :func:`canonical_dumps` is the compact, key-sorted form used where JSON
is hashed or embedded (markers, fingerprints, safetensors metadata).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

__all__ = ["write_json", "canonical_dumps"]


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
    path = Path(path)
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default) + "\n"  # fails before any file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def canonical_dumps(obj: Any) -> str:
    """Compact, key-sorted JSON (``separators=(",", ":")``): equal objects give equal text, for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))

"""The one JSON writer: parent directory, atomic replace, UTF-8, trailing newline, nothing left on failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tocom_hub.core.jsonio import canonical_dumps, write_json


def test_writes_utf8_with_newline_and_creates_parents(tmp_path):
    path = tmp_path / "a" / "b" / "out.json"
    got = write_json(path, {"z": 1, "name": "Straße", "p": Path("x/y")})
    assert got == path
    raw = path.read_bytes()
    assert raw.endswith(b"}\n")
    assert json.loads(raw.decode("utf-8")) == {"z": 1, "name": "Straße", "p": "x/y"}  # default=str
    assert list(path.parent.iterdir()) == [path]  # no temporary file left


def test_options_indent_and_sort_keys(tmp_path):
    write_json(tmp_path / "s.json", {"b": 1, "a": [1, 2]}, indent=None, sort_keys=True)
    assert (tmp_path / "s.json").read_text(encoding="utf-8") == '{"a": [1, 2], "b": 1}\n'
    write_json(tmp_path / "i.json", {"b": 1}, indent=1)
    assert (tmp_path / "i.json").read_text(encoding="utf-8") == '{\n "b": 1\n}\n'


def test_failed_write_keeps_old_file_and_leaves_no_tmp(tmp_path):
    path = tmp_path / "keep.json"
    write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()}, default=None)
    assert json.loads(path.read_text()) == {"ok": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]


def test_canonical_dumps_is_order_independent():
    assert canonical_dumps({"b": 1, "a": {"d": 2, "c": 3}}) == canonical_dumps({"a": {"c": 3, "d": 2}, "b": 1})
    assert canonical_dumps({"b": 1, "a": 2}) == '{"a":2,"b":1}'

"""argparse value types of the ``tocom-hub`` options: ``r`` values and lists (``0,4,8`` or ``0-16``), bounded
ints, finite floats, fractions, JSON objects. Torch-free (``tocom-hub --help`` imports it); ``training/evaluate.py``
parses its ``--targets`` with :func:`r_list` too."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any, Dict, List

__all__ = [
    "r_value",
    "r_list",
    "int_at_least",
    "positive_int",
    "non_negative_int",
    "finite_float",
    "fraction",
    "json_object",
]


def r_value(text: str) -> int:
    """argparse type: one compression degree ``r`` (a non-negative int)."""
    text = text.strip()
    if re.fullmatch(r"-\s*\d+", text):
        raise argparse.ArgumentTypeError(f"r must be >= 0 (tokens removed per block); got {text!r}")
    if not re.fullmatch(r"\d+", text):
        raise argparse.ArgumentTypeError(f"r must be a non-negative integer (tokens removed per block); got {text!r}")
    return int(text)


def r_list(text: str) -> List[int]:
    """argparse type: ``0,4,8,16`` or ranges like ``0-16`` (sorted, duplicates dropped)."""
    values: List[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        span = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if span:
            lo, hi = int(span.group(1)), int(span.group(2))
            if lo > hi:
                raise argparse.ArgumentTypeError(f"empty r range {part!r}; write low-high, e.g. 0-16")
            values.extend(range(lo, hi + 1))
        else:
            values.append(r_value(part))
    if not values:
        raise argparse.ArgumentTypeError(f"expected r values such as 0,4,8,16 or 0-16; got {text!r}")
    return sorted(set(values))


def int_at_least(minimum: int, what: str):
    """argparse type: an int >= ``minimum``, with ``what`` in the error message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


positive_int = int_at_least(1, "a positive integer")
non_negative_int = int_at_least(0, "a non-negative integer")


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number; got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0; got {text!r}")
    return value


def fraction(text: str) -> float:
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1]; got {text!r}")
    return value


def json_object(text: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f'not valid JSON ({e}); example: \'{{"img_size": 64, "depth": 2}}\'') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"img_size\": 64}}'; got {text!r}")
    return value

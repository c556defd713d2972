"""Every ``--help`` line shows its option's default: the ``tocom-hub`` sub-commands and the training scripts."""

from __future__ import annotations

import argparse
import re
from typing import Any, Iterator, List, Tuple

import pytest

from tocom_hub import cli
from tocom_hub.cli.options import DefaultsFormatter
from tocom_hub.training import distill, evaluate, finetune, segment

PARSERS = {
    "tocom-hub": cli.build_parser,
    "distill.py": distill.build_parser,
    "finetune.py": finetune.build_parser,
    "evaluate.py": evaluate.build_parser,
    "segment.py": segment.build_parser,
}


def _parsers(name: str, parser: argparse.ArgumentParser) -> Iterator[Tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, sub_parser in action.choices.items():
                yield from _parsers(f"{name} {sub}", sub_parser)


def _forms(default: Any, action: argparse.Action) -> List[str]:
    """How a default may read in a help line."""
    if action.nargs == 0:  # switches
        return ["on" if default else "off"]
    forms = [str(default), repr(default)]
    if isinstance(default, (list, tuple)):
        forms += [",".join(map(str, default)), " ".join(map(str, default))]
    if isinstance(default, float):
        forms.append(f"{default:g}")
    return forms


def _same_number(default: Any, text: str) -> bool:
    """A float default written another way (``1e-3`` for 0.001)."""
    if not isinstance(default, float):
        return False
    return any(float(t) == default for t in re.findall(r"(?<![\w.])[-+]?\d+(?:\.\d*)?(?:e[-+]?\d+)?", text))


def hidden_defaults(name: str, parser: argparse.ArgumentParser) -> List[str]:
    """``"<parser> <flag>: <default>"`` for every option whose help text does not show its default."""
    out = []
    for prog, p in _parsers(name, parser):
        for action in p._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            if action.default is None or action.default is argparse.SUPPRESS:
                continue
            text = p._get_formatter()._expand_help(action)
            shown = "default" in text.lower() and (
                any(f in text for f in _forms(action.default, action)) or _same_number(action.default, text)
            )
            if not shown:
                out.append(f"{prog} {action.option_strings[-1]}: {action.default!r} not in {text!r}")
    return out


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_default_is_in_help(name):
    missing = hidden_defaults(name, PARSERS[name]())
    assert not missing, "\n".join(missing)


def test_the_check_sees_a_hidden_default():
    """A deliberately wrong parser: one default the help does not show, one the plain formatter drops."""
    p = argparse.ArgumentParser(prog="x", formatter_class=DefaultsFormatter)
    p.add_argument("--shown", type=int, default=3, help="a count")
    p.add_argument("--switch", action="store_true", help="a switch")
    p.add_argument("--unset", default=None, help="nothing to show")
    p.add_argument("--hidden", type=int, default=7, help="a count (default: the model's)")
    p.add_argument("--lr", type=float, default=1e-3, help="a rate (default 1e-3)")
    p.add_argument("--wrong", type=float, default=1e-3, help="a rate (default 1e-4)")
    assert [m.split(":")[0] for m in hidden_defaults("x", p)] == ["x --hidden", "x --wrong"]
    plain = argparse.ArgumentParser(prog="y")
    plain.add_argument("--shown", type=int, default=3, help="a count")
    assert [m.split(":")[0] for m in hidden_defaults("y", plain)] == ["y --shown"]
    assert "(default: 3)" in p.format_help() and "(default: off)" in p.format_help()

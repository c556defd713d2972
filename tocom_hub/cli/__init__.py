"""The ``tocom-hub`` command line (also ``python -m tocom_hub``)::

    tocom-hub download org/name [--revision v1.0]      # prints the local directory
    tocom-hub info org/name [--json]                   # or a local directory / .safetensors file
    tocom-hub push out/bank org/name [--private]
    tocom-hub eval --model NAME_OR_PATH --data DIR --source-r 0 --target-r 0,4,8,16 [--bank ID]
    tocom-hub bench --model NAME --r 0,8,16 --batch 8
    tocom-hub visualize --model NAME_OR_PATH --image img.jpg --r 8 -o merged.png
    tocom-hub convert official.pth -o DIR
    tocom-hub export --model NAME --bank ID --source-r 0 --target-r 0,8 -o model.onnx [--format onnx,torch]
    tocom-hub serve --model demo [--budget-ms 100] [--fixed-r 8] [--port 8000]   # Ray Serve, loopback

Adding a sub-command: write ``<name>_command(args) -> int`` and ``add_<name>_parser(subparsers)``
(which creates the sub-parser with ``parents=[COMMON]`` and ``set_defaults(func=<name>_command)``),
then append the ``add_…`` function to :data:`COMMANDS`. Import heavy modules inside the command
function so ``tocom-hub --help`` stays fast. Errors are printed as one line and exit with status 1
(``--debug`` shows the traceback instead); usage errors exit with status 2.

One module per command group: :mod:`.banks` (download / info / push), :mod:`.evaluation` (eval),
:mod:`.tools` (bench / visualize / convert), :mod:`.export` (export), :mod:`.serve` (serve); :mod:`.options`
holds the options they share and :mod:`.types` the argparse value types (``r`` lists and the like).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, List, Optional, Sequence

from .banks import (
    add_download_parser,
    add_info_parser,
    add_push_parser,
    download_command,
    info_command,
    push_command,
)
from .evaluation import add_eval_parser, eval_command
from .export import add_export_parser, export_command
from .options import COMMON, DefaultsFormatter
from .serve import add_serve_parser, serve_command
from .tools import (
    add_bench_parser,
    add_convert_parser,
    add_visualize_parser,
    bench_command,
    convert_command,
    visualize_command,
)

__all__ = [
    "main",
    "build_parser",
    "COMMANDS",
    "COMMON",
    "download_command",
    "info_command",
    "push_command",
    "eval_command",
    "bench_command",
    "visualize_command",
    "convert_command",
    "export_command",
    "serve_command",
]

# ---------------------------------------------------------------------------------------------------
# entry point

COMMANDS: List[Callable[[Any], None]] = [
    add_download_parser,
    add_info_parser,
    add_push_parser,
    add_eval_parser,
    add_bench_parser,
    add_visualize_parser,
    add_convert_parser,
    add_export_parser,
    add_serve_parser,
]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="tocom-hub",
        description="ToCom banks for timm Vision Transformers: get, inspect and share them; "
        "evaluate, benchmark and visualise token merging.",
        formatter_class=DefaultsFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tocom-hub {__version__}")
    parser.add_argument("--debug", action="store_true", default=False, help="show the full traceback on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for add in COMMANDS:
        add(subparsers)
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 error, 2 usage, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("tocom-hub: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(f"tocom-hub {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

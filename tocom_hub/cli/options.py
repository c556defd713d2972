"""Options and loaders shared by the sub-commands: ``--debug`` (:data:`COMMON`), the Hub options, the
model options and the bank options, and the help formatter that keeps the ``examples:`` epilogs."""

from __future__ import annotations

import argparse
import os
from typing import Any, Dict

from ..core.checks import METHODS
from .types import finite_float, json_object, positive_int, positive_seconds, r_value

# tocom_hub.hub.DEFAULT_TIMEOUT, stated here so that building the parser imports no torch (test_cli checks they agree)
HUB_TIMEOUT = 120.0

# options every sub-command accepts (SUPPRESS: a sub-command must not reset what the top level parsed)
COMMON = argparse.ArgumentParser(add_help=False)
COMMON.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback on errors")


def _add_hub_options(parser: argparse.ArgumentParser, *, download: bool = True) -> None:
    parser.add_argument("--revision", default=None, help="branch, tag or commit sha (default: main)")
    if download:
        parser.add_argument(
            "--cache-dir", default=None, help="huggingface_hub cache directory (default: $HF_HUB_CACHE)"
        )
        parser.add_argument(
            "--local-files-only",
            action="store_true",
            help="use the local cache only, never the network (like HF_HUB_OFFLINE=1)",
        )
    parser.add_argument("--token", default=None, help="Hugging Face token (default: $HF_TOKEN or the stored login)")
    if download:
        parser.add_argument(
            "--timeout",
            type=positive_seconds,
            default=HUB_TIMEOUT,
            metavar="SECONDS",
            help="deadline for each bank file to arrive, metadata request included; a stalled or trickling "
            "download is abandoned and nothing is kept",
        )


def _add_trust_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-unverified",
        action="store_true",
        help="load a bank file that carries no tocom_sha256 checksum (its tensors and config "
        "cannot be verified; only for files you made or trust)",
    )


class DefaultsFormatter(argparse.HelpFormatter):
    """Every flag's default at the end of its help line (like ``argparse.ArgumentDefaultsHelpFormatter``,
    except where the help already states it, e.g. "default: the model's", and with "off" / "none" for
    switches and unset values instead of ``False`` / ``None``). The formatter of every ``tocom-hub``
    command and training script."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.nargs == 0:  # store_true / store_false switches
            return f"{text} (default: {'on' if action.default else 'off'})"
        if action.default is None or action.default == []:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


class _ExamplesFormatter(DefaultsFormatter):
    """Wraps the description like argparse does, keeps the ``examples:`` epilog as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def command_parser(subparsers: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A sub-command's parser with the options every command shares (``--debug``) and the examples epilog
    kept as written."""
    return subparsers.add_parser(name, parents=[COMMON], formatter_class=_ExamplesFormatter, **kwargs)


_MODEL_HELP = (
    "a timm model name (built with pretrained=False unless --pretrained), a model alias ('demo': the "
    "training scripts' embedded tiny ViT; 'study-backbone', 'study-shape-count-src0', 'study-shape-count-src16': "
    "the quickstart's study models, which tocom_hub.demo.demo_bank_path() was trained for; all offline), or a "
    "saved model: a directory with timm's config.json + model.safetensors "
    "(written by timm.models.save_for_hf(model, DIR, safe_serialization=True)) or a training/finetune.py "
    "output directory (finetune.json + model.safetensors)"
)


def _add_model_options(parser: argparse.ArgumentParser, *, weights: bool = True) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=True, metavar="NAME_OR_PATH", help=_MODEL_HELP)
    g.add_argument(
        "--model-kwargs",
        type=json_object,
        default=None,
        metavar="JSON",
        help="keyword arguments for timm.create_model as a JSON object, "
        'e.g. \'{"img_size": 64, "depth": 2, "num_classes": 3}\'',
    )
    if weights:
        g.add_argument(
            "--pretrained",
            action="store_true",
            help="load timm's pretrained weights for a timm name (needs the network or the HF cache)",
        )
        g.add_argument(
            "--checkpoint",
            default=None,
            metavar="FILE",
            help="model weights: .safetensors, or a torch state dict (read with weights_only=True)",
        )
    g.add_argument(
        "--method",
        choices=METHODS,
        default=None,
        help="token reduction: tome (merge) or evit (prune); default: the bank's, else tome",
    )
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, … (default: cuda when available)")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")


def _load_model(args: argparse.Namespace):
    """``(model, info, device)`` for the model options; rejects unsupported architectures up front."""
    import torch

    from .. import demo  # noqa: F401 -- registers the "demo" model alias
    from ..core.patch import patch, unpatch
    from ..tools.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, info = load_model(
        args.model,
        model_kwargs=args.model_kwargs,
        pretrained=getattr(args, "pretrained", False),
        checkpoint=getattr(args, "checkpoint", None),
    )
    unpatch(patch(model, method=args.method or "tome"))  # TypeError for Eva, Swin, … before any work
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device), info, device


def _warn_about_model(command: str, args: argparse.Namespace, model: Any, info: Dict[str, Any], bank: Any) -> None:
    """Warn (stderr) when the results will say nothing: random weights, or a bank made for another backbone
    (:func:`tocom_hub.tools.bank_fit.backbone_mismatch`: architecture, pretrained tag, backbone weights)."""
    import sys

    if info.get("weights") == "random-init":
        print(
            f"tocom-hub {command}: WARNING: {args.model} has RANDOM weights (no --pretrained, no --checkpoint): "
            f"its results say nothing about a trained model.\n    For meaningful ones pass --pretrained "
            f"(timm's weights), --checkpoint FILE, a saved model directory, or --model demo.",
            file=sys.stderr,
        )
    if bank is not None:
        from ..tools.bank_fit import backbone_mismatch, model_lineage

        mismatch = backbone_mismatch(bank, model, model_lineage(model, info))
        if mismatch:
            print(f"tocom-hub {command}: warning: {mismatch}", file=sys.stderr)


def _model_label(info: Dict[str, Any], method: str, *, detail: bool = False) -> str:
    """``demo (vit_tiny_patch16_224, tome)`` for aliases and paths, ``deit_small_patch16_224 (tome)`` for names;
    ``detail`` adds the size-changing ``model_kwargs`` (``32 px, depth 6``) so a plot names the model really run."""
    name, arch = str(info.get("name", info["model"])), info["model"]
    extra = ""
    if detail:
        kw = info.get("model_kwargs") or {}
        size = kw.get("img_size")
        if isinstance(size, (list, tuple)):
            size = size[0] if len(set(size)) == 1 else "x".join(str(v) for v in size)
        parts = [f"{size} px" if size else ""]
        parts += [f"{key.replace('_', ' ')} {kw[key]}" for key in ("depth", "embed_dim") if key in kw]
        extra = "".join(f", {p}" for p in parts if p)
        name = os.path.basename(os.path.normpath(name)) if os.path.isdir(name) else name
    return f"{arch} ({method}{extra})" if name == arch else f"{name} ({arch}, {method}{extra})"


def _add_bank_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("ToCom bank")
    g.add_argument(
        "--bank",
        default=None,
        metavar="ID_OR_PATH",
        help="ToCom bank: a local directory / tocom.safetensors file or a Hub repo id",
    )
    g.add_argument(
        "--source-r",
        type=r_value,
        default=None,
        help="r the model was fine-tuned at (the bank's source degree); default: the model "
        "directory's finetune.json, else 0",
    )
    g.add_argument("--scale", type=finite_float, default=None, help="ToCom scale s (default: the bank's)")
    _add_hub_options(g)
    _add_trust_option(g)


def _load_bank(args: argparse.Namespace):
    if args.bank is None:
        return None
    from ..hub.load import is_local_bank, load_bank

    if is_local_bank(args.bank):  # the Hub options do not apply to a path
        return load_bank(args.bank, trust_unverified=args.trust_unverified)
    hub = dict(revision=args.revision, cache_dir=args.cache_dir, token=args.token, timeout=args.timeout)
    return load_bank(args.bank, local_files_only=args.local_files_only, trust_unverified=args.trust_unverified, **hub)


def _write_json(path: str, obj: Any) -> None:
    from ..core.jsonio import write_json

    write_json(path, obj)

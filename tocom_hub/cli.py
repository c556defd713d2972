"""The ``tocom-hub`` command line (also ``python -m tocom_hub``)::

    tocom-hub download org/name [--revision v1.0]      # prints the local directory
    tocom-hub info org/name [--json]                   # or a local directory / .safetensors file
    tocom-hub push out/bank org/name [--private]
    tocom-hub eval --model NAME_OR_PATH --data DIR --source-r 0 --target-r 0,4,8,16 [--bank ID]
    tocom-hub bench --model NAME --r 0,8,16 --batch 8
    tocom-hub visualize --model NAME_OR_PATH --image img.jpg --r 8 -o merged.png
    tocom-hub convert official.pth -o DIR

Adding a sub-command: write ``<name>_command(args) -> int`` and ``add_<name>_parser(subparsers)``
(which creates the sub-parser with ``parents=[COMMON]`` and ``set_defaults(func=<name>_command)``),
then append the ``add_…`` function to :data:`COMMANDS`. Import heavy modules inside the command
function so ``tocom-hub --help`` stays fast. Errors are printed as one line and exit with status 1
(``--debug`` shows the traceback instead); usage errors exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

from .core.checks import METHODS

__all__ = ["main", "build_parser", "COMMANDS", "COMMON"]

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


def _add_trust_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-unverified",
        action="store_true",
        help="load a bank file that carries no tocom_sha256 checksum (its tensors and config "
        "cannot be verified; only for files you made or trust)",
    )


# ---------------------------------------------------------------------------------------------------
# download


def download_command(args: argparse.Namespace) -> int:
    from .hub import download_bank

    path = download_bank(
        args.repo_id,
        revision=args.revision,
        cache_dir=args.cache_dir,
        token=args.token,
        local_files_only=args.local_files_only,
        force_download=args.force_download,
    )
    print(path)
    return 0


def add_download_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "download",
        parents=[COMMON],
        help="download a bank into the Hugging Face cache",
        description="Download a ToCom bank (tocom.safetensors + tocom_config.json) into the "
        "Hugging Face cache and print its local directory.",
    )
    p.add_argument("repo_id", help="Hub repo id, e.g. org/tocom-deit-base")
    _add_hub_options(p)
    p.add_argument("--force-download", action="store_true", help="download even if the files are cached")
    p.set_defaults(func=download_command)


# ---------------------------------------------------------------------------------------------------
# info


def _describe(args: argparse.Namespace) -> Dict[str, Any]:
    from .core.bank import ToComBank
    from .hub import bank_facts, download_bank

    target = args.repo_id_or_path
    if os.path.exists(target):
        path, source = target, {"path": os.path.abspath(target)}
    else:
        path = download_bank(
            target,
            revision=args.revision,
            cache_dir=args.cache_dir,
            token=args.token,
            local_files_only=args.local_files_only,
        )
        source = {
            "repo_id": target,
            "revision": args.revision or "main",
            "commit": os.path.basename(path),
            "path": path,
        }
    bank = ToComBank.from_pretrained(path, trust_unverified=args.trust_unverified)
    facts = bank_facts(bank, path)
    facts["size_mb"] = round(facts["size_bytes"] / 1e6, 3)
    return {**source, **facts}


def _print_info(d: Dict[str, Any]) -> None:
    rows = []
    if "repo_id" in d:
        rows.append(("bank", f"{d['repo_id']} (revision {d['revision']}, commit {d['commit'][:12]})"))
    rows += [
        ("path", d["path"]),
        ("base model", d["base_model"] or "not recorded"),
        ("method", d["method"]),
        ("r range", f"{d['r_min']}-{d['r_max']} ({d['r_max']} LoRA groups)"),
        ("rank", str(d["rank"])),
        ("targets", ", ".join(d["targets"])),
        ("parameters", f"{d['num_parameters']:,}"),
        ("size on disk", f"{d['size_mb']:.2f} MB ({d['size_bytes']:,} bytes)"),
        ("dtype", d["dtype"]),
        ("scale", str(d["scale"])),
        ("backbone", f"embed_dim {d['embed_dim']}, depth {d['depth']}, {d['num_heads']} heads"),
        ("format version", str(d["format_version"])),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for key, label in (("training_recipe", "training recipe"), ("eval_results", "eval results")):
        if d.get(key):
            print(f"{label}:")
            for line in _nested_lines(d[key], indent="  "):
                print(line)


def _short_floats(value: Any) -> Any:
    """Floats to 4 significant digits, inside lists and dicts too (for reading, not for the JSON output)."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, list):
        return [_short_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: _short_floats(v) for k, v in value.items()}
    return value


def _nested_lines(value: Any, indent: str, width: int = 100) -> List[str]:
    """A JSON-like value as indented ``key: value`` lines; small lists / dicts stay on one line."""
    value = _short_floats(value)
    if not isinstance(value, dict):
        return [f"{indent}{json.dumps(value, default=str)}"]
    lines: List[str] = []
    pad = max((len(str(k)) for k in value), default=0)
    for k, v in value.items():
        flat = json.dumps(v, default=str) if not isinstance(v, str) else v
        if isinstance(v, dict) and len(indent) + pad + 2 + len(flat) > width:
            lines.append(f"{indent}{k}:")
            lines += _nested_lines(v, indent + "  ", width)
        else:
            lines.append(f"{indent}{str(k) + ':':<{pad + 1}} {flat}")
    return lines


def info_command(args: argparse.Namespace) -> int:
    described = _describe(args)
    if args.json:
        print(json.dumps(described, indent=2, default=str))
    else:
        _print_info(described)
    return 0


def add_info_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "info",
        parents=[COMMON],
        help="print a bank's metadata and size",
        description="Print what a ToCom bank is: base model, method, r range, rank, "
        "targets, parameter count, size on disk, scale and format version.",
    )
    p.add_argument("repo_id_or_path", help="Hub repo id, or a local bank directory / tocom.safetensors file")
    _add_hub_options(p)
    _add_trust_option(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=info_command)


# ---------------------------------------------------------------------------------------------------
# push


def push_command(args: argparse.Namespace) -> int:
    from .core.bank import ToComBank
    from .hub import push_bank

    if not os.path.exists(args.dir):
        raise FileNotFoundError(f"no bank directory or file at {args.dir} (write one with ToComBank.save_pretrained)")
    bank = ToComBank.from_pretrained(args.dir, trust_unverified=args.trust_unverified)
    info = push_bank(
        bank,
        args.repo_id,
        revision=args.revision,
        private=args.private or None,
        token=args.token,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
        license=args.license,
    )
    print(getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or info)
    return 0


def add_push_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "push",
        parents=[COMMON],
        help="upload a bank directory with a model card",
        description="Upload tocom.safetensors, tocom_config.json and a generated README.md "
        "model card to a Hub repo (created if needed); prints the commit URL.",
    )
    p.add_argument("dir", help="bank directory written by ToComBank.save_pretrained")
    p.add_argument("repo_id", help="Hub repo id, e.g. my-org/tocom-deit-base")
    _add_hub_options(p, download=False)
    _add_trust_option(p)
    p.add_argument("--private", action="store_true", help="create the repo as private (if it does not exist)")
    p.add_argument("--commit-message", default=None, help="commit message (default: a summary of the bank)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument(
        "--license",
        default=None,
        help="license for the model card (default: the backbone's weights license, else apache-2.0)",
    )
    p.set_defaults(func=push_command)


# ---------------------------------------------------------------------------------------------------
# shared by eval / bench / visualize: r values, the model, the bank


class _ExamplesFormatter(argparse.HelpFormatter):
    """Wraps the description like argparse does, keeps the ``examples:`` epilog as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


_MODEL_HELP = (
    "a timm model name (built with pretrained=False unless --pretrained), a model alias ('demo': the "
    "embedded tiny ViT, offline), or a saved model: a directory with timm's config.json + model.safetensors "
    "(written by timm.models.save_for_hf(model, DIR, safe_serialization=True)) or a training/finetune.py "
    "output directory (finetune.json + model.safetensors)"
)


def _r_value(text: str) -> int:
    """argparse type: one compression degree ``r`` (a non-negative int)."""
    text = text.strip()
    if re.fullmatch(r"-\s*\d+", text):
        raise argparse.ArgumentTypeError(f"r must be >= 0 (tokens removed per block); got {text!r}")
    if not re.fullmatch(r"\d+", text):
        raise argparse.ArgumentTypeError(f"r must be a non-negative integer (tokens removed per block); got {text!r}")
    return int(text)


def _r_list(text: str) -> List[int]:
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
            values.append(_r_value(part))
    if not values:
        raise argparse.ArgumentTypeError(f"expected r values such as 0,4,8,16 or 0-16; got {text!r}")
    return sorted(set(values))


def _int_at_least(minimum: int, what: str):
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


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "a non-negative integer")


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number; got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1]; got {text!r}")
    return value


def _json_object(text: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f'not valid JSON ({e}); example: \'{{"img_size": 64, "depth": 2}}\'') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"img_size\": 64}}'; got {text!r}")
    return value


def _add_model_options(parser: argparse.ArgumentParser, *, weights: bool = True) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=True, metavar="NAME_OR_PATH", help=_MODEL_HELP)
    g.add_argument(
        "--model-kwargs",
        type=_json_object,
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
    g.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")


def _load_model(args: argparse.Namespace):
    """``(model, info, device)`` for the model options; rejects unsupported architectures up front."""
    import torch

    from .core.patch import patch, unpatch
    from .demo.models import load_model

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
        type=_r_value,
        default=None,
        help="r the model was fine-tuned at (the bank's source degree); default: the model "
        "directory's finetune.json, else 0",
    )
    g.add_argument("--scale", type=_finite_float, default=None, help="ToCom scale s (default: the bank's)")
    _add_hub_options(g)
    _add_trust_option(g)


def _load_bank(args: argparse.Namespace):
    if args.bank is None:
        return None
    from .core.bank import ToComBank
    from .hub.download import bank_path

    hub = dict(revision=args.revision, cache_dir=args.cache_dir, token=args.token)
    path = bank_path(args.bank, local_files_only=args.local_files_only, **hub)
    return ToComBank.from_pretrained(path, trust_unverified=args.trust_unverified)


def _write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")


# ---------------------------------------------------------------------------------------------------
# eval


def eval_command(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from .tools.evaluation import (
        add_intervals,
        build_eval_dataset,
        evaluate,
        format_table,
        label_warning,
        plot_accuracy,
    )

    for path in (args.json, args.plot):
        if path and os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a directory; pass a file name (e.g. out/eval.json, out/eval.png)")
    model, info, device = _load_model(args)
    bank = _load_bank(args)
    source_r = args.source_r if args.source_r is not None else int(info.get("source_r") or 0)
    method = args.method or (bank.method if bank is not None else None) or info.get("method") or "tome"
    dataset = build_eval_dataset(model, args.data, split=args.split, limit=args.limit, class_map=args.class_map)
    warning = label_warning(dataset, model)
    if warning:
        print(f"tocom-hub eval: warning: {warning}", file=sys.stderr)
    loader = DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers, pin_memory=device.type == "cuda"
    )
    rows = evaluate(
        model,
        loader,
        args.target_r,
        bank=bank,
        source_r=source_r,
        scale=args.scale,
        method=method,
        device=device,
        keep_correct=bank is not None,
    )
    add_intervals(rows)  # +ToCom − plain with its 95 % paired-bootstrap interval over the images
    scale = None if bank is None else (args.scale if args.scale is not None else bank.scale)
    result = {
        "model": info["model"],
        "model_label": _model_label(info, method, detail=True),
        "model_info": info,
        "data": os.path.abspath(args.data) if os.path.isdir(args.data) else args.data,
        "data_name": os.path.basename(os.path.normpath(args.data)),
        "split": args.split,
        "images": rows[0]["images"],
        "method": method,
        "source_r": source_r,
        "target_r": args.target_r,
        "bank": args.bank,
        "scale": scale,
        "batch_size": args.batch_size,
        "device": str(device),
        "rows": rows,
    }
    bank_text = f", bank {args.bank} (s={scale:g})" if bank is not None else ""
    print(
        f"{_model_label(info, method)} on {result['data_name']}: {result['images']} images, source r={source_r}"
        f"{bank_text}"
    )
    print(format_table(rows, source_r=source_r))
    if args.json:
        _write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot_accuracy(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def add_eval_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval",
        parents=[COMMON],
        formatter_class=_ExamplesFormatter,
        help="accuracy and images/s per target r, with/without a bank",
        description="Top-1 accuracy and images/s of a model at every target r: plain ToMe/EViT ('no ToCom') and, with "
        "--bank, the bank merged for source r -> target r, with the 95 % interval of the difference "
        "(paired bootstrap over the images). Images/s is the median over batches with its 10th-90th "
        "percentile. Prints a table; --json / --plot write the results and an accuracy-vs-r figure "
        "(PNG, 95 % interval per point).",
        epilog="examples:\n"
        "  tocom-hub eval --model out/finetune-r0 --data imagenet/val --target-r 0,4,8,16 --bank org/tocom-deit-b \\\n"
        "      --json eval.json --plot eval.png\n"
        "  tocom-hub eval --model deit_base_patch16_224 --checkpoint deit_b.safetensors --data imagenet \\\n"
        "      --source-r 16 --target-r 0-16 --bank out/bank --scale 0.1 --limit 2000\n"
        '  tocom-hub eval --model vit_tiny_patch16_224 --model-kwargs \'{"img_size": 64, "depth": 2}\' \\\n'
        "      --data my_folder --target-r 0,4,8\n\n"
        "--data is an ImageFolder root (DIR/<class>/<image>; a val/ or validation/ sub-folder is used when\n"
        "present) or an embedded dataset name (tocom_hub.data). Images get timm's eval transform for the model.",
    )
    _add_model_options(p)
    g = p.add_argument_group("evaluation")
    g.add_argument("--data", required=True, metavar="DIR", help="ImageFolder root, or an embedded dataset name")
    g.add_argument("--split", default="validation", help="split sub-folder to look for under DIR (default validation)")
    g.add_argument("--class-map", default=None, metavar="FILE", help="timm class map file (class name per line)")
    g.add_argument(
        "--target-r",
        type=_r_list,
        default=[0, 4, 8, 16],
        metavar="R,R,…",
        help="target r values, e.g. 0,4,8,16 or 0-16 (default 0,4,8,16)",
    )
    g.add_argument("--batch-size", type=_positive_int, default=32, help="images per batch (default 32)")
    g.add_argument("--workers", type=_non_negative_int, default=2, help="DataLoader workers (default 2)")
    g.add_argument("--limit", type=_positive_int, default=None, metavar="N", help="evaluate the first N images only")
    g.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    g.add_argument("--plot", default=None, metavar="FILE.png", help="write accuracy vs target r as a PNG")
    _add_bank_options(p)
    p.set_defaults(func=eval_command)


# ---------------------------------------------------------------------------------------------------
# bench


def bench_command(args: argparse.Namespace) -> int:
    from .tools.benchmark import benchmark, format_table

    if args.json and os.path.isdir(args.json):
        raise IsADirectoryError(f"{args.json} is a directory; pass a file name such as bench.json")
    model, info, device = _load_model(args)
    method = args.method or "tome"
    result = benchmark(
        model, args.r, batch_size=args.batch_size, method=method, iters=args.iters, warmup=args.warmup, seed=args.seed
    )
    print(format_table(result, title=_model_label(info, method)))
    if args.json:
        _write_json(args.json, {"model": info["model"], "model_info": info, **result})
        print(f"wrote {args.json}")
    return 0


def add_bench_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        parents=[COMMON],
        formatter_class=_ExamplesFormatter,
        help="latency / throughput table per r vs plain timm",
        description="Latency (median and p90, ms per batch) and throughput (images/s) of a model at each r, next to "
        "plain timm, with the speed-up. Measurements are interleaved (each iteration visits every "
        "configuration once, in random order) so load drifts hit all configurations alike. Weights do "
        "not change the speed: a timm name is built with random weights. A bank merged into the "
        "weights costs nothing, so there is no --bank.",
        epilog="examples:\n"
        "  tocom-hub bench --model deit_base_patch16_224 --r 0,8,16 --batch 8\n"
        "  tocom-hub bench --model vit_small_patch16_224 --r 0-16 --batch 1 --threads 4 --iters 50 --json b.json\n"
        "  tocom-hub bench --model deit_small_patch16_224 --method evit --r 0,10,20",
    )
    _add_model_options(p, weights=False)
    g = p.add_argument_group("benchmark")
    g.add_argument(
        "--r", type=_r_list, default=[0, 8, 16], metavar="R,R,…", help="r values, e.g. 0,8,16 or 0-16 (default 0,8,16)"
    )
    g.add_argument(
        "--batch",
        "--batch-size",
        dest="batch_size",
        type=_positive_int,
        default=8,
        help="images per forward (default 8)",
    )
    g.add_argument("--iters", type=_positive_int, default=20, help="timed forwards per configuration (default 20)")
    g.add_argument("--warmup", type=_non_negative_int, default=3, help="untimed forwards per configuration (default 3)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random batch and of the visiting order")
    g.add_argument("--json", default=None, metavar="FILE", help="also write the table (and every sample) as JSON")
    p.set_defaults(func=bench_command)


# ---------------------------------------------------------------------------------------------------
# visualize


def visualize_command(args: argparse.Namespace) -> int:
    from .tools.visualize import visualize

    if not os.path.isfile(args.image):
        raise FileNotFoundError(f"--image {args.image}: no such file")
    if os.path.isdir(args.output):
        raise IsADirectoryError(f"-o {args.output} is a directory; pass a file name such as merged.png")
    model, info, _ = _load_model(args)
    if info.get("weights") == "random-init":
        print(
            f"tocom-hub visualize: WARNING: {args.model} has RANDOM weights (no --pretrained, no --checkpoint): its "
            f"merge groups say nothing about a trained model.\n    For a meaningful picture pass --pretrained "
            f"(timm's weights), --checkpoint FILE, a saved model directory, or --model demo.",
            file=sys.stderr,
        )
    bank = _load_bank(args)
    source_r = args.source_r if args.source_r is not None else int(info.get("source_r") or 0)
    out = visualize(
        model,
        args.image,
        args.r,
        args.output,
        method=args.method,
        bank=bank,
        source_r=source_r,
        scale=args.scale,
        alpha=args.alpha,
        cell=args.cell,
        json_path=args.json,
    )
    prefix = f" (+{out['prefix_tokens']} prefix)" if out["prefix_tokens"] else ""
    pruned = f", {out['pruned_patches']} patches pruned (grey)" if out["pruned_patches"] else ""
    print(
        f"{_model_label(info, out['method'])} r={args.r}: {out['patches']} patches -> {out['tokens_left']} tokens"
        f"{prefix}, {out['groups']} colour groups{pruned}"
    )
    print(f"wrote {out['output']} and {out['json']}")
    return 0


def add_visualize_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "visualize",
        parents=[COMMON],
        formatter_class=_ExamplesFormatter,
        help="paint the patches merged into each token",
        description="Run one image through the model at r with source tracing and paint every token's patches one "
        "colour. The PNG has three panels: the input (as the model saw it), the groups over it with "
        "borders, and the groups as flat colours (one exact colour per token left after the last block, "
        "prefix tokens excluded). With EViT each kept token is one patch and the patches of pruned "
        "tokens are grey. A side-car JSON (default: OUTPUT with .json) holds the token and group counts.",
        epilog="examples:\n"
        "  tocom-hub visualize --model deit_small_patch16_224 --pretrained --image cat.jpg --r 8 -o merged.png\n"
        "  tocom-hub visualize --model out/finetune-r0 --image cat.jpg --r 16 --method evit -o pruned.png\n"
        "  tocom-hub visualize --model out/finetune-r0 --image cat.jpg --r 16 --bank out/bank -o tocom.png",
    )
    _add_model_options(p)
    g = p.add_argument_group("picture")
    g.add_argument("--image", required=True, metavar="FILE", help="input image (any format Pillow reads)")
    g.add_argument("--r", type=_r_value, required=True, help="tokens merged (or pruned) per block")
    g.add_argument("-o", "--output", required=True, metavar="FILE.png", help="output PNG")
    g.add_argument("--json", default=None, metavar="FILE", help="side-car JSON (default: OUTPUT with .json)")
    g.add_argument("--alpha", type=_fraction, default=0.5, help="opacity of the colours over the image (default 0.5)")
    g.add_argument(
        "--cell",
        type=_positive_int,
        default=None,
        metavar="PX",
        help="pixels per patch in the output (default: panels of about 320 px)",
    )
    _add_bank_options(p)
    p.set_defaults(func=visualize_command)


# ---------------------------------------------------------------------------------------------------
# convert


def convert_command(args: argparse.Namespace) -> int:
    import warnings

    import torch

    from .core.bank import WEIGHTS_NAME
    from .tools.convert import convert_official

    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"{args.checkpoint}: no such file (expected an official ToCom .pth checkpoint)")
    if os.path.isfile(args.output_dir):
        raise FileExistsError(f"-o {args.output_dir} is a file; pass a directory for the bank")
    if os.path.isfile(os.path.join(args.output_dir, WEIGHTS_NAME)) and not args.overwrite:
        raise FileExistsError(
            f"{args.output_dir} already holds a bank ({WEIGHTS_NAME}); pass --overwrite to replace it"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bank = convert_official(
            args.checkpoint,
            r_max=args.r_max,
            num_heads=args.num_heads,
            scale=args.scale,
            method=args.method,
            base_model=args.base_model,
            pretrained_tag=args.pretrained_tag,
        )
    for w in caught:
        print(f"tocom-hub convert: warning: {w.message}", file=sys.stderr)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype)
    bank.save_pretrained(args.output_dir, dtype=dtype)
    c = bank.config
    print(
        f"converted {args.checkpoint}: {c.depth} blocks, targets {','.join(c.targets)}, r 0-{c.r_max}, rank {c.rank}, "
        f"{bank.num_parameters():,} parameters, method {c.method}, scale {c.scale:g}"
    )
    print(f"wrote {args.output_dir} (load it with ToComBank.from_pretrained or --bank {args.output_dir})")
    return 0


def add_convert_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "convert",
        parents=[COMMON],
        formatter_class=_ExamplesFormatter,
        help="convert an official ToCom checkpoint into a bank",
        description="Read a checkpoint in the official ToCom layout (blocks.{i}.attn.{q,v}_tocom.adapter_{down,up}."
        "weight; loaded with torch.load(weights_only=True), no code runs) and save it as a tocom-hub bank "
        "directory (tocom.safetensors + tocom_config.json).",
        epilog="examples:\n"
        "  tocom-hub convert tocom_deit_base.pth -o tocom-deit-base --base-model deit_base_patch16_224 --num-heads 12\n"
        "  tocom-hub convert tocom_evit.pth -o tocom-evit --method evit --dtype fp16\n"
        "  tocom-hub push tocom-deit-base my-org/tocom-deit-base      # then share it",
    )
    p.add_argument("checkpoint", metavar="official.pth", help="official ToCom checkpoint (.pth)")
    p.add_argument("-o", "--output-dir", required=True, metavar="DIR", help="bank directory to write")
    p.add_argument(
        "--method", choices=METHODS, default="tome", help="token reduction the bank was trained for (default tome)"
    )
    p.add_argument("--base-model", default=None, help="timm architecture of the backbone, e.g. deit_base_patch16_224")
    p.add_argument("--pretrained-tag", default=None, help="timm pretrained tag of the backbone, e.g. fb_in1k")
    p.add_argument("--r-max", type=_positive_int, default=16, help="R, groups in the checkpoint (default 16)")
    p.add_argument(
        "--num-heads",
        type=_positive_int,
        default=None,
        help="attention heads of the backbone (default: width / 64, with a warning)",
    )
    p.add_argument("--scale", type=_finite_float, default=0.1, help="default scale s stored in the bank (default 0.1)")
    p.add_argument(
        "--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="dtype on disk (default: the checkpoint's)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a bank already in DIR")
    p.set_defaults(func=convert_command)


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
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="tocom-hub",
        description="ToCom banks for timm Vision Transformers: get, inspect and share them; "
        "evaluate, benchmark and visualise token merging.",
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

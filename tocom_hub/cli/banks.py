"""``tocom-hub download`` / ``info`` / ``push``: get, inspect and share banks on the Hugging Face Hub."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List

from .options import _add_hub_options, _add_trust_option, command_parser

CARD_FILE = "README.md"

# ---------------------------------------------------------------------------------------------------
# download


def download_command(args: argparse.Namespace) -> int:
    from ..hub import download_bank

    path = download_bank(
        args.repo_id,
        revision=args.revision,
        cache_dir=args.cache_dir,
        token=args.token,
        local_files_only=args.local_files_only,
        force_download=args.force_download,
        timeout=args.timeout,
    )
    print(path)
    return 0


def add_download_parser(subparsers: Any) -> None:
    p = command_parser(
        subparsers,
        "download",
        help="download a bank into the Hugging Face cache",
        description="Download a ToCom bank (tocom.safetensors + tocom_config.json) into the "
        "Hugging Face cache and print its local directory. Each file must arrive within --timeout seconds; "
        "what arrives is checked against its hash and the bank's own checksum, and evicted when it fails.",
    )
    p.add_argument("repo_id", help="Hub repo id, e.g. org/tocom-deit-base")
    _add_hub_options(p)
    p.add_argument("--force-download", action="store_true", help="download even if the files are cached")
    p.set_defaults(func=download_command)


# ---------------------------------------------------------------------------------------------------
# info


def _describe(args: argparse.Namespace) -> Dict[str, Any]:
    from ..core.bank.module import ToComBank
    from ..hub import bank_facts, download_bank, is_local_bank

    target = args.repo_id_or_path
    if is_local_bank(target):
        path, source = target, {"path": os.path.abspath(target)}
    else:
        path = download_bank(
            target,
            revision=args.revision,
            cache_dir=args.cache_dir,
            token=args.token,
            local_files_only=args.local_files_only,
            timeout=args.timeout,
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
    p = command_parser(
        subparsers,
        "info",
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
    from ..core.bank.module import ToComBank
    from ..hub import push_bank

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
        dry_run=args.dry_run,
    )
    if args.dry_run:
        print(f"dry run: would upload to {info['repo_id']} (revision {info['revision']}): {info['commit_message']}")
        for name, size in info["files"].items():
            print(f"  {name}  {size:,} bytes")
        print(f"--- {CARD_FILE} ---")
        print(info["card"].rstrip("\n"))
        return 0
    print(getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or info)
    return 0


def add_push_parser(subparsers: Any) -> None:
    p = command_parser(
        subparsers,
        "push",
        help="upload a bank directory with a model card",
        description="Upload tocom.safetensors, tocom_config.json and a generated README.md "
        "model card to a Hub repo (created if needed); prints the commit URL. --dry-run prints the file "
        "list and the card instead, without any request.",
    )
    p.add_argument("dir", help="bank directory written by ToComBank.save_pretrained")
    p.add_argument("repo_id", help="Hub repo id, e.g. my-org/tocom-deit-base")
    _add_hub_options(p, download=False)
    _add_trust_option(p)
    p.add_argument("--private", action="store_true", help="create the repo as private (if it does not exist)")
    p.add_argument("--commit-message", default=None, help="commit message (default: a summary of the bank)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument(
        "--dry-run", action="store_true", help="print the files and the model card that would be uploaded; no network"
    )
    p.add_argument(
        "--license",
        default=None,
        help="license for the model card (default: the backbone's weights license, else apache-2.0)",
    )
    p.set_defaults(func=push_command)

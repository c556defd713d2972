"""``tocom-hub serve``: a ToCom model behind Ray Serve, ``r`` moved by the latency controller (needs
``pip install tocom-hub[serve]``; docs/serving.md)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .options import command_parser
from .types import finite_float, int_at_least, positive_int, r_list

non_negative_int = int_at_least(0, "a non-negative integer")


def serve_command(args: argparse.Namespace) -> int:
    from ..serving.config import ServeConfig

    cfg = ServeConfig(  # validates every setting before Ray starts
        model=args.model,
        bank=args.bank,
        no_bank=args.no_bank,
        source_r=args.source_r,
        scale=args.scale,
        method=args.method,
        budget_ms=args.budget_ms,
        fixed_r=args.fixed_r,
        r_values=args.r,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_ms / 1000.0,
        top_k=args.top_k,
        threads=args.threads,
    )
    try:
        import ray  # noqa: F401
        from ray import serve
    except ImportError:
        raise RuntimeError("tocom-hub serve needs Ray Serve: pip install 'tocom-hub[serve]'") from None
    from ..serving.app import run

    run(
        cfg,
        host=args.host,
        port=args.port,
        num_cpus=args.num_cpus,
        replica_cpus=args.replica_cpus,
        num_replicas=args.replicas,
        address=args.address,
    )
    url = f"http://{args.host}:{args.port}"
    print(f"serving {args.model} at {url}/ (POST an image; GET {url}/metrics, {url}/info; POST {url}/r)", flush=True)
    try:
        if args.duration is not None:
            time.sleep(args.duration)
        else:
            while True:
                time.sleep(3600)
    finally:
        import ray

        serve.shutdown()
        if args.address is None:
            ray.shutdown()
    return 0


def add_serve_parser(subparsers: Any) -> None:
    p = command_parser(
        subparsers,
        "serve",
        help="serve a model over HTTP on Ray Serve, r switched between batches to hold a latency budget",
        description="Start Ray (or join a cluster with --address auto), Ray Serve's HTTP proxy on --host:--port "
        "(loopback unless told otherwise) and one deployment of the model: requests are batched, every batch "
        "runs at one r, and the latency controller moves r between batches to keep the in-replica latency "
        "(queue + forward) within --budget-ms. Needs tocom-hub[serve]. Stops on Ctrl-C (or after --duration).",
        epilog="examples:\n"
        "  tocom-hub serve --model demo\n"
        "  tocom-hub serve --model demo --fixed-r 8 --port 8001\n"
        "  tocom-hub serve --model out/finetune-r0 --bank out/bank --budget-ms 40 --address auto --replicas 4\n"
        "  curl -s -H 'Content-Type: image/png' --data-binary @img.png http://127.0.0.1:8000/",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        required=True,
        metavar="NAME_OR_PATH",
        help="'demo' (the embedded demo, fine-tuned at r = 0, with its bank), a timm name, a saved model folder "
        "or a finetune output",
    )
    g.add_argument("--bank", default=None, help="bank folder / file or Hub id (default: the demo's for --model demo)")
    g.add_argument("--no-bank", action="store_true", help="plain ToMe / EViT (r still switches)")
    g.add_argument("--source-r", type=non_negative_int, default=None, help="r the model was tuned at (default: its)")
    g.add_argument("--scale", type=finite_float, default=None, help="ToCom scale s (default: the bank's / demo's)")
    g.add_argument("--method", choices=["tome", "evit"], default=None, help="default: the bank's, else tome")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: the replica's)")
    g = p.add_argument_group("serving")
    g.add_argument("--budget-ms", type=finite_float, default=100.0, help="in-replica latency budget (default 100)")
    g.add_argument("--fixed-r", type=non_negative_int, default=None, help="serve at this r only (default: adaptive)")
    g.add_argument("--r", type=r_list, default=None, metavar="R,R,…", help="r values allowed (default: the bank's)")
    g.add_argument("--max-batch-size", type=positive_int, default=16, help="@serve.batch size (default 16)")
    g.add_argument("--batch-wait-ms", type=finite_float, default=5.0, help="@serve.batch wait (default 5)")
    g.add_argument("--top-k", type=positive_int, default=5, help="classes per answer (default 5)")
    g = p.add_argument_group("Ray")
    g.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1: loopback only)")
    g.add_argument("--port", type=positive_int, default=8000, help="HTTP port (default 8000)")
    g.add_argument("--address", default=None, help="join this Ray cluster ('auto': the local head; default: start one)")
    g.add_argument("--num-cpus", type=positive_int, default=None, help="CPUs of a started Ray (default: all)")
    g.add_argument("--replica-cpus", type=finite_float, default=1.0, help="CPUs per replica (default 1)")
    g.add_argument("--replicas", type=positive_int, default=1, help="replicas (default 1)")
    g.add_argument("--duration", type=finite_float, default=None, help="stop after this many seconds (default: never)")
    p.set_defaults(func=serve_command)

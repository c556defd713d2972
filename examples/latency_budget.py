"""Hold a latency budget while the server's load changes: r follows the load up and back down.

    python examples/latency_budget.py                     # offline, CPU, ~15 s
    python examples/latency_budget.py --load 2.0 --requests 80

A small timm ViT (random weights, no download) serves 60 requests of 4 images. Requests 20-39 run on
a "busy server": a forward hook stretches every forward to ``--load`` times its own duration (the
slowdown is proportional to the work the model does, i.e. to the tokens it processes). The
:class:`tocom_hub.LatencyController` calibrates the latency of every r once, starts at the smallest
r within the budget, moves r up within a few requests of the slowdown and back down once it ends.

The bank here is an untrained stand-in with random LoRA factors (``ToComBank.for_model``): accuracy
means nothing in this example, but switching r runs the real path (``tocom_hub.set_target_r`` on
the merged weights). Pass ``--no-bank`` for plain ToMe r control.
"""

import argparse
import statistics

import timm
import torch

import tocom_hub
from tocom_hub.tools.timing import WallTimer


class SimulatedLoad:
    """Forward hooks that make every forward take ``load`` times as long (sleeping the difference)."""

    def __init__(self, model, clock):
        self.load, self.clock, self._start = 1.0, clock, 0.0
        model.register_forward_pre_hook(self._before)
        model.register_forward_hook(self._after)

    def _before(self, module, args):
        self._start = self.clock()

    def _after(self, module, args, output):
        import time

        if self.load > 1.0:
            time.sleep((self.load - 1.0) * (self.clock() - self._start))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--busy", default="20-39", help="requests served on the busy server (default 20-39)")
    parser.add_argument("--load", type=float, default=1.6, help="slowdown while busy (default 1.6x)")
    parser.add_argument(
        "--budget-ms",
        type=float,
        default=None,
        help="latency budget per batch (default: 1.15x the measured r=0 latency)",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--no-bank", action="store_true", help="plain ToMe r control, no ToCom bank")
    args = parser.parse_args()
    busy_lo, busy_hi = (int(v) for v in args.busy.split("-"))

    torch.manual_seed(0)
    torch.set_num_threads(1)  # one thread: steadier timings on a shared machine
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=10,
        img_size=112,
        patch_size=8,
        depth=4,
        embed_dim=192,
        num_heads=3,
    ).eval()
    x = torch.randn(args.batch_size, 3, 112, 112)
    r_values = list(range(0, 49, 4))  # 196 patches, 4 blocks: r up to 48 merges almost everything

    bank = None
    if not args.no_bank:
        bank = tocom_hub.ToComBank.for_model(model, r_max=max(r_values), rank=2)
        with torch.no_grad():  # stand-in for a trained bank: small random factors
            for t in bank.targets:
                bank.lora_B[t].normal_(0.0, 0.02)

    budget = args.budget_ms
    if budget is None:
        with torch.inference_mode():
            plain = [WallTimer().ms(lambda: model(x)) for _ in range(6)][1:]
        budget = 1.15 * statistics.median(plain)

    ctl = tocom_hub.LatencyController(
        model, bank, source_r=0, budget_ms=budget, batch_size=args.batch_size, r_values=r_values
    )
    curve = ctl.calibrate(x)
    print(
        f"budget {budget:.1f} ms per batch of {args.batch_size}; calibrated ms per r: "
        + ", ".join(f"{r}: {ms:.1f}" for r, ms in curve.items())
    )
    print(f"start at r = {ctl.r}\n")

    load = SimulatedLoad(model, ctl.clock)
    print(f"{'request':>7}  {'load':>5}  {'ms':>7}  {'budget?':>8}  {'r':>3}  event")
    for i in range(args.requests):
        load.load = args.load if busy_lo <= i <= busy_hi else 1.0
        before = ctl.r
        ctl(x)
        h = ctl.history[-1]
        event = f"r {before} -> {ctl.r}" if ctl.r != before else ""
        flag = "over" if h["ms"] > budget else "ok"
        print(f"{i:>7}  {load.load:>4.1f}x  {h['ms']:>7.1f}  {flag:>8}  {before:>3}  {event}")

    rs = [h["r"] for h in ctl.history]
    calm_before = rs[busy_lo - 1] if busy_lo > 0 else rs[0]
    busy_max = max(rs[busy_lo : busy_hi + 1])
    print(f"\nr before the load: {calm_before}, highest r under load: {busy_max}, r at the end: {ctl.r}")
    ctl.remove()


if __name__ == "__main__":
    main()

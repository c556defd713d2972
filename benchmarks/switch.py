"""Switch latency of a merged ToCom bank vs reloading a per-r checkpoint, and bank size on disk.

DeiT-B dimensions (timm ``deit_base_patch16_224``, ``pretrained=False``: the timing does not depend on
the weights), R = 16, rank 2, targets q + v. Rounds are interleaved (switch up, switch down, reload
up, reload down, …) so that load from other processes hits all contenders alike; medians over rounds.

    python benchmarks/switch.py --rounds 200 --json out/switch.json

Targets (printed as PASS / FAIL): median switch 0 ↔ 16 ≤ 10 ms; fp16 bank file ≤ 2.4 MB.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tocom_hub  # noqa: E402
from tocom_hub.core.bank.module import CONFIG_NAME, WEIGHTS_NAME, ToComBank  # noqa: E402
from tocom_hub.core.jsonio import write_json  # noqa: E402
from tocom_hub.tools.timing import WallTimer, interleaved  # noqa: E402

SWITCH_LIMIT_MS = 10.0
SIZE_LIMIT_MB = 2.4


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_base_patch16_224")
    p.add_argument("--r-max", type=int, default=16)
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--forward-rounds", type=int, default=10, help="batch-1 forwards at r=R, merged vs no bank")
    p.add_argument("--json", default="out/switch.json", help="where to write the results ('' to skip)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = timm.create_model(args.model, pretrained=False).eval()
    bank = ToComBank.for_model(model, r_max=args.r_max, rank=args.rank, targets=("q", "v"))
    with torch.no_grad():  # a trained-looking bank (the fresh one has zero up factors)
        for a in bank.lora_B.values():
            a.normal_(0.0, 0.02)
    R = args.r_max

    with tempfile.TemporaryDirectory() as tmp:
        # bank size on disk
        copy.deepcopy(bank).half().save_pretrained(os.path.join(tmp, "fp16"))
        bank.save_pretrained(os.path.join(tmp, "fp32"))
        size16 = os.path.getsize(os.path.join(tmp, "fp16", WEIGHTS_NAME))
        size32 = os.path.getsize(os.path.join(tmp, "fp32", WEIGHTS_NAME))
        cfg_size = os.path.getsize(os.path.join(tmp, "fp16", CONFIG_NAME))

        apply_ms = WallTimer().ms(lambda: tocom_hub.apply(model, 0, 0, bank=bank))
        # the alternative: one full checkpoint per r, reloaded on a switch
        tocom_hub.set_target_r(model, R)
        sd_hi = {k: v.clone() for k, v in model.state_dict().items()}
        tocom_hub.set_target_r(model, 0)
        sd_lo = {k: v.clone() for k, v in model.state_dict().items()}
        from safetensors.torch import load_file, save_file

        f_hi, f_lo = os.path.join(tmp, f"r{R}.safetensors"), os.path.join(tmp, "r0.safetensors")
        save_file(sd_hi, f_hi)
        save_file(sd_lo, f_lo)
        ckpt_mb = os.path.getsize(f_hi) / 1e6

        def reload_mem(sd, r):
            model.load_state_dict(sd)
            tocom_hub.set_r(model, r)

        def reload_disk(path, r):
            model.load_state_dict(load_file(path))
            tocom_hub.set_r(model, r)

        contenders = {
            "tocom set_target_r": (lambda: tocom_hub.set_target_r(model, R), lambda: tocom_hub.set_target_r(model, 0)),
            "load_state_dict (in memory)": (lambda: reload_mem(sd_hi, R), lambda: reload_mem(sd_lo, 0)),
            "safetensors file + load_state_dict": (lambda: reload_disk(f_hi, R), lambda: reload_disk(f_lo, 0)),
        }
        steps = {(name, way): fn for name, pair in contenders.items() for way, fn in zip(("up", "down"), pair)}
        ms = interleaved(steps, args.warmup + args.rounds, order="fixed")  # each up is followed by its down
        times = {name: (ms[name, "up"][args.warmup :], ms[name, "down"][args.warmup :]) for name in contenders}
        # forward at r = R with the bank merged vs the same patched model without a bank
        tocom_hub.set_target_r(model, R)
        plain = copy.deepcopy(model)
        tocom_hub.remove(plain)
        tocom_hub.patch(plain, method="tome")
        tocom_hub.set_r(plain, R)
        x = torch.randn(1, 3, 224, 224)
        with torch.inference_mode():
            runners = {"merged bank": lambda m=model: m(x), "no bank": lambda m=plain: m(x)}
            fwd = {k: v[2:] for k, v in interleaved(runners, 2 + args.forward_rounds, order="fixed").items()}
        del plain
        tocom_hub.set_target_r(model, 0)
        tocom_hub.remove(model)

    rows = []
    for name, (ups, downs) in times.items():
        rows.append(
            {
                "method": name,
                "up_ms": statistics.median(ups),
                "down_ms": statistics.median(downs),
                "switch_ms": statistics.median(ups + downs),
                "p90_ms": sorted(ups + downs)[int(0.9 * (len(ups) + len(downs))) - 1],
            }
        )
    switch_ms = rows[0]["switch_ms"]
    result = {
        "model": args.model,
        "r_max": R,
        "rank": args.rank,
        "targets": ["q", "v"],
        "threads": args.threads,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "platform": platform.processor() or platform.machine(),
        "bank_parameters": bank.num_parameters(),
        "bank_file_fp16_bytes": size16,
        "bank_file_fp32_bytes": size32,
        "bank_config_bytes": cfg_size,
        "full_checkpoint_mb": ckpt_mb,
        "first_apply_ms": apply_ms,
        "forward_ms_r_max": {k: statistics.median(v) for k, v in fwd.items()} if args.forward_rounds else None,
        "rows": rows,
        "switch_ms": switch_ms,
        "pass_switch": switch_ms <= SWITCH_LIMIT_MS,
        "pass_size": size16 / 1e6 <= SIZE_LIMIT_MB,
    }

    print(f"{args.model}: R={R}, rank={args.rank}, q+v, {args.threads} threads, {args.rounds} interleaved rounds")
    print(f"{'switch 0 <-> ' + str(R):<38} {'up ms':>8} {'down ms':>8} {'median':>8} {'p90':>8}")
    for row in rows:
        print(
            f"{row['method']:<38} {row['up_ms']:8.2f} {row['down_ms']:8.2f} "
            f"{row['switch_ms']:8.2f} {row['p90_ms']:8.2f}"
        )
    print(
        f"bank: {bank.num_parameters():,} parameters; tocom.safetensors fp16 {size16 / 1e6:.3f} MB, "
        f"fp32 {size32 / 1e6:.3f} MB (+ {cfg_size} B config); full checkpoint per r {ckpt_mb:.1f} MB"
    )
    print(f"first apply (patch + copies + merge): {apply_ms:.1f} ms")
    if args.forward_rounds:
        f = result["forward_ms_r_max"]
        print(
            f"forward batch 1 at r={R}: merged bank {f['merged bank']:.1f} ms, no bank {f['no bank']:.1f} ms "
            f"(ratio {f['merged bank'] / f['no bank']:.3f}; merged mode adds no work to the forward)"
        )
    print(
        f"acceptance: switch {switch_ms:.2f} ms <= {SWITCH_LIMIT_MS} ms: "
        f"{'PASS' if result['pass_switch'] else 'FAIL'}; "
        f"fp16 size {size16 / 1e6:.3f} MB <= {SIZE_LIMIT_MB} MB: {'PASS' if result['pass_size'] else 'FAIL'}"
    )
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()

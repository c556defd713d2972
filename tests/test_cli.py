"""``tocom-hub``: every command's help, one-line errors with the right exit status, the Hub commands' output,
``convert``, the ``demo`` alias and ``--trust-unverified`` — run through :func:`tocom_hub.cli.main` on tiny offline
models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tool_helpers import DEPTH, NAME, run

from tocom_hub import ToComBank, cli
from tocom_hub.demo.models import DEMO_WEIGHTS

pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.py: one torch thread for the module


@pytest.mark.parametrize("command", ["eval", "bench", "visualize", "convert", "serve"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"tocom-hub {command} " in out.split("examples:")[1]


def test_help_imports_neither_torch_nor_timm():
    """`tocom-hub --help` must answer at once: nothing heavy is imported to build the parser."""
    import subprocess
    import sys

    code = (
        "import sys; from tocom_hub.cli import build_parser; build_parser().format_help(); "
        "assert 'torch' not in sys.modules and 'timm' not in sys.modules, sorted(sys.modules); "
        "import tocom_hub, tocom_hub.core.patch; assert callable(tocom_hub.patch) and tocom_hub.patch.__module__ "
        "== 'tocom_hub.core.patch'; assert tocom_hub.ToComBank.__name__ == 'ToComBank'"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_info_prints_recipe_and_results_on_several_lines(files, tmp_path, capsys):
    bank = ToComBank.from_pretrained(files / "bank")
    bank.config.training_recipe = {"lr": 0.001, "steps": 10, "model_kwargs": {"img_size": 64, "depth": 2}}
    bank.config.eval_results = {"heldout_kl_no_bank": 0.0537794553, "pairs": [[1, 2], [3, 4]]}
    bank.save_pretrained(tmp_path / "b")
    code, out, err = run(["info", tmp_path / "b"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert "training recipe:" in lines and "eval results:" in lines
    assert any(line.split() == ["lr:", "0.001"] for line in lines)
    assert any(line.split() == ["heldout_kl_no_bank:", "0.05378"] for line in lines)
    assert max(len(line) for line in lines) < 120


def test_unreachable_hub_is_one_line_without_retries(hub_server, tmp_path, capfd, caplog):
    """Hub down and the bank not cached: one clear line at once, none of huggingface_hub's retry lines
    (it retries such a connection 5 times with back-off) and no traceback; --debug raises the error."""
    import logging

    from tocom_hub.hub import BankNotFoundError

    caplog.set_level(logging.INFO, logger="huggingface_hub")
    hub_server.stop()
    argv = ["info", "org/never-cached", "--cache-dir", str(tmp_path / "cache")]
    assert cli.main(argv) == 1
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tocom-hub info: error: "), err
    assert "could not be reached" in err and "HF_HUB_OFFLINE=1" in err
    assert "Retrying" not in err and "Traceback" not in err
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]
    with pytest.raises(BankNotFoundError, match="could not be reached") as info:
        cli.main([*argv, "--debug"])
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert "Retrying" not in capfd.readouterr().err


def test_convert_official_checkpoint(tmp_path, capsys):
    R, h, d = 16, 2, 64
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(DEPTH):
        for t in ("q", "v"):
            sd[f"blocks.{i}.attn.{t}_tocom.adapter_down.weight"] = torch.randn(R * h, d, generator=g)
            sd[f"blocks.{i}.attn.{t}_tocom.adapter_up.weight"] = torch.randn(d, R * h, generator=g)
    torch.save(sd, tmp_path / "official.pth")
    out = tmp_path / "bank"
    code, stdout, err = run(
        ["convert", tmp_path / "official.pth", "-o", out, "--num-heads", "2", "--base-model", NAME], capsys
    )
    assert code == 0, err
    assert "2 blocks" in stdout
    bank = ToComBank.from_pretrained(out)
    assert (bank.r_max, bank.rank, bank.config.num_heads, bank.config.base_model) == (R, h, 2, NAME)
    # official group g -> g+1 sits at inner slice [R·h − h(g+1), R·h − h·g)
    for n in (1, 5, 16):
        want = (
            sum(
                sd["blocks.1.attn.v_tocom.adapter_up.weight"][:, R * h - h * (k + 1) : R * h - h * k]
                @ sd["blocks.1.attn.v_tocom.adapter_down.weight"][R * h - h * (k + 1) : R * h - h * k]
                for k in range(n)
            )
            * 0.1
        )
        assert torch.allclose(bank.delta(1, "v", 0, n), want, atol=1e-4)
    code, _, err = run(["convert", tmp_path / "official.pth", "-o", out], capsys)
    assert code == 1 and "--overwrite" in err


def _unsupported():
    return [
        "--model",
        "xcit_nano_12_p16_224",
        "--model-kwargs",
        json.dumps(dict(img_size=64, depth=2, embed_dim=64, num_heads=2)),
    ]


ERRORS = [
    # missing files
    (["eval", "--model", "{m}", "--data", "{root}/nope"], 1, "no such directory"),
    (["eval", "--model", NAME, "--checkpoint", "{root}/nope.safetensors", "--data", "{root}/data"], 1, "no such file"),
    (["eval", "--model", "{root}/nope_model", "--data", "{root}/data"], 1, "no such file or directory"),
    (["eval", "--model", "{m}", "--data", "{root}/data", "--bank", "{root}/nope_bank"], 1, "does not exist"),
    (
        ["visualize", "--model", "{m}", "--image", "{root}/nope.jpg", "--r", "4", "-o", "{root}/x.png"],
        1,
        "no such file",
    ),
    (["convert", "{root}/nope.pth", "-o", "{root}/out"], 1, "no such file"),
    # bad r
    (["bench", "--model", "{m}", "--r", "0,40"], 1, "r must be an int in [0, 32] (the model sees 65 tokens"),
    (
        ["visualize", "--model", "{m}", "--image", "{root}/img.png", "--r", "33", "-o", "{root}/x.png"],
        1,
        "tome removes at most 32 in one block); got 33",
    ),
    (
        ["eval", "--model", "{m}", "--data", "{root}/data", "--bank", "{root}/bank", "--target-r", "0,9"],
        1,
        "target_rs[1] must be an int in [0, 8] (the bank's range); got 9",
    ),
    (["bench", "--model", "{m}", "--r", "-3"], 2, "r must be >= 0"),
    (["bench", "--model", "{m}", "--r", "0,4.5"], 2, "non-negative integer"),
    (
        ["visualize", "--model", "{m}", "--image", "{root}/img.png", "--r", "x", "-o", "{root}/x.png"],
        2,
        "non-negative integer",
    ),
    # unsupported / unknown models
    (["bench", *_unsupported(), "--r", "0"], 1, "cannot patch Xcit"),
    (["eval", *_unsupported(), "--data", "{root}/data"], 1, "cannot patch Xcit"),
    (
        ["visualize", *_unsupported(), "--image", "{root}/img.png", "--r", "2", "-o", "{root}/x.png"],
        1,
        "cannot patch Xcit",
    ),
    (["bench", "--model", "vit_no_such_model", "--r", "0"], 1, "unknown model"),
]


@pytest.mark.parametrize("argv,code,message", ERRORS, ids=[f"{a[0]}-{m}" for a, _, m in ERRORS])
def test_errors_are_one_clear_line(files, capsys, argv, code, message):
    argv = [a.replace("{root}", str(files)).replace("{m}", str(files / "model")) for a in argv]
    if code == 2:
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
    else:
        got, _, err = run(argv, capsys)
        assert got == code
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1 and lines[0].startswith(f"tocom-hub {argv[0]}: error:")
    assert message in err and "Traceback" not in err


def test_debug_shows_the_exception(files):
    with pytest.raises(ValueError, match=r"r must be an int in \[0, 32\] .*; got 40$"):
        cli.main(["bench", "--debug", "--model", str(files / "model"), "--r", "40"])


def test_demo_alias(files, tmp_path, capsys):
    """`--model demo` is the embedded model: a clear error until its weights ship, then every command runs."""
    argv = {
        "bench": ["bench", "--model", "demo", "--r", "0,8", "--batch", "2", "--iters", "2", "--warmup", "0"],
        "visualize": [
            "visualize",
            "--model",
            "demo",
            "--image",
            files / "img.png",
            "--r",
            "8",
            "-o",
            tmp_path / "d.png",
        ],
        "eval": [
            "eval",
            "--model",
            "demo",
            "--data",
            "photo-crops",
            "--limit",
            "8",
            "--target-r",
            "0,8",
            "--workers",
            "0",
        ],
    }
    for name, args in argv.items():
        code, out, err = run(args, capsys)
        if DEMO_WEIGHTS.is_file():
            assert code == 0, (name, err)
        else:
            assert code == 1 and "demo weights" in err and "Traceback" not in err, (name, err)


def test_trust_unverified_flag_loads_a_bank_without_checksum(files, tmp_path, capsys):
    """A bank file stripped of its checksum is refused by info / push / eval, and loads with --trust-unverified."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    bank_dir = tmp_path / "unverified"
    shutil.copytree(files / "bank", bank_dir)
    path = bank_dir / "tocom.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta.pop("tocom_sha256")
    save_file(load_file(str(path)), str(path), metadata=meta)

    code, out, err = run(["info", bank_dir], capsys)
    assert code != 0 and "tocom_sha256" in err, (code, err)
    code, out, err = run(["info", bank_dir, "--trust-unverified"], capsys)
    assert code == 0, err
    assert "r_max" in out or "r range" in out or "rank" in out
    argv = [
        "eval",
        "--model",
        files / "model",
        "--data",
        files / "data",
        "--target-r",
        "0,2",
        "--bank",
        bank_dir,
        "--batch-size",
        "4",
        "--workers",
        "0",
    ]
    code, out, err = run(argv, capsys)
    assert code != 0 and "tocom_sha256" in err, (code, err)
    code, out, err = run([*argv, "--trust-unverified"], capsys)
    assert code == 0, err


def test_r_list_is_the_one_r_parser():
    """``0,4,8`` / ``0-16`` for every command and for training/evaluate.py --targets: sorted, no duplicates,
    torch-free (see test_help_imports_neither_torch_nor_timm)."""
    import argparse

    from tocom_hub.cli.types import r_list, r_value
    from tocom_hub.training import evaluate as training_evaluate

    assert r_list("8, 0,4-6,4") == [0, 4, 5, 6, 8] and r_list("3") == [3] and r_value(" 7 ") == 7
    bad_lists = {"6-2": "empty r range", "-1": "r must be >= 0", "a": "non-negative integer", ",": "expected r values"}
    for bad, message in bad_lists.items():
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            r_list(bad)
    args = training_evaluate.parse_args(["--targets", "4,0-2,2"])
    assert args.targets == [0, 1, 2, 4]
    with pytest.raises(SystemExit):
        training_evaluate.parse_args(["--targets", "6-2"])

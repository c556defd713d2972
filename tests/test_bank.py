"""ToComBank / ToComConfig: construction, the delta arithmetic vs a naive loop, files and their checks."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from bank_helpers import naive_delta, random_groups
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import make_timm, make_vit

from tocom_hub import ToComBank, ToComConfig
from tocom_hub.core.bank import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, _tensors_sha256


@pytest.fixture(scope="module")
def model():
    return make_vit("cls_token")  # embed 64, depth 3, 2 heads


@pytest.fixture
def bank(model):
    b = ToComBank.for_model(model, r_max=5, rank=2, targets=("q", "v"))
    random_groups(b, seed=1)
    return b


# -- construction ---------------------------------------------------------------------------------


def test_for_model_reads_dims_and_metadata():
    model = make_timm("vit_tiny_patch16_224")
    bank = ToComBank.for_model(model, r_max=16, rank=2)
    cfg = bank.config
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.attn_dim) == (64, 3, 2, None)
    assert (cfg.r_max, cfg.rank, cfg.targets, cfg.method, cfg.scale) == (16, 2, ("q", "v"), "tome", 0.1)
    assert cfg.base_model == "vit_tiny_patch16_224" and cfg.pretrained_tag == "augreg_in21k_ft_in1k"
    assert cfg.base_model_id == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert cfg.format_version == FORMAT_VERSION
    assert tuple(bank.A["q"].shape) == (3, 64, 32) and tuple(bank.B["v"].shape) == (3, 32, 64)


def test_lora_init_is_a_no_op_with_nonzero_down_factors(model):
    bank = ToComBank.for_model(model, r_max=4, rank=3, targets=("q", "k", "v", "proj"))
    for t in bank.targets:
        assert not bank.A[t].any()
        B = bank.B[t]
        assert B.abs().max() <= 1 / math.sqrt(B.shape[-1]) and B.std() > 0
        assert not bank.delta(1, t, 0, 4).any()


def test_deit_base_parameter_count_matches_paper():
    cfg = ToComConfig(embed_dim=768, depth=12, num_heads=12, r_max=16, rank=2)
    bank = ToComBank(cfg, device="meta")
    assert bank.num_parameters() == 1_179_648  # paper §4.1: 1.2M for DeiT-B = 16 × 12 × 2 × (768·2 + 2·768)


def test_attn_dim_and_proj_shapes():
    cfg = ToComConfig(embed_dim=64, depth=2, num_heads=2, attn_dim=96, targets=("q", "proj"), r_max=3)
    bank = ToComBank(cfg)
    assert tuple(bank.A["q"].shape) == (2, 96, 6) and tuple(bank.B["q"].shape) == (2, 6, 64)
    assert tuple(bank.A["proj"].shape) == (2, 64, 6) and tuple(bank.B["proj"].shape) == (2, 6, 96)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(targets=("q", "x")), "targets"),
        (dict(targets=("q", "q")), "targets"),
        (dict(targets="qv"), "targets"),
        (dict(method="dynamicvit"), "method"),
        (dict(rank=0), "rank"),
        (dict(r_max=True), "r_max"),
        (dict(scale=float("nan")), "scale"),
        (dict(format_version=FORMAT_VERSION + 1), "newer"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ToComConfig(embed_dim=64, depth=2, num_heads=2, **kwargs)


def test_config_json_round_trip(tmp_path):
    cfg = ToComConfig(
        embed_dim=64,
        depth=2,
        num_heads=2,
        targets=("q", "v", "proj"),
        base_model="vit_x",
        training_recipe={"epochs": 10, "lr": 1e-3},
        eval_results={"vtab": {"0->16": 69.9}},
    )
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert data["targets"] == ["q", "v", "proj"] and data["training_recipe"]["epochs"] == 10
    assert ToComConfig.from_json_file(tmp_path / CONFIG_NAME) == cfg
    with pytest.warns(UserWarning, match="unknown"):
        assert ToComConfig.from_dict(dict(data, future_field=1)) == cfg


# -- arithmetic -----------------------------------------------------------------------------------


def test_delta_matches_naive_loop(model):
    bank = ToComBank.for_model(model, r_max=5, rank=2, targets=("q", "k", "v", "proj"))
    groups = random_groups(bank, seed=3)
    for t in bank.targets:
        for b in range(bank.depth):
            for m, n in [(0, 5), (5, 0), (1, 4), (4, 1), (2, 3), (3, 3)]:
                got = bank.delta(b, t, m, n)
                ref = naive_delta(groups, t, b, m, n, bank.scale)
                assert got.dtype == torch.float32
                torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-6 * max(ref.abs().max().item(), 1))
    assert torch.allclose(bank.delta(0, "q", 0, 5, scale=0.05), bank.delta(0, "q", 0, 5) / 2, atol=1e-7)


def test_delta_invariants(bank):
    for b in range(bank.depth):
        for t in bank.targets:
            d = lambda m, n, b=b, t=t: bank.delta(b, t, m, n).double()  # noqa: E731
            torch.testing.assert_close(d(1, 3) + d(3, 5), d(1, 5), rtol=0, atol=1e-6)  # m→n then n→k = m→k
            torch.testing.assert_close(d(4, 2) + d(2, 0), d(4, 0), rtol=0, atol=1e-6)
            torch.testing.assert_close(d(0, 4) + d(4, 2), d(0, 2), rtol=0, atol=1e-6)  # up then down
            torch.testing.assert_close(d(4, 1), -d(1, 4), rtol=0, atol=0)  # n→m = −(m→n)
            assert not d(2, 2).any()  # m = n: no-op


def test_delta_rejects_bad_arguments(bank):
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        bank.delta(0, "q", 0, 6)
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        bank.delta(0, "q", -1, 2)
    with pytest.raises(ValueError, match="target"):
        bank.delta(0, "k", 0, 1)
    with pytest.raises(ValueError, match="block"):
        bank.delta(3, "q", 0, 1)


# -- files ----------------------------------------------------------------------------------------


def test_save_load_round_trip(bank, tmp_path):
    bank.config.training_recipe = {"epochs": 10}
    bank.save_pretrained(tmp_path / "b")
    assert sorted(os.listdir(tmp_path / "b")) == [WEIGHTS_NAME, CONFIG_NAME]  # no temp files left behind
    loaded = ToComBank.from_pretrained(tmp_path / "b")
    assert loaded.config == bank.config
    for k, v in bank.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert all(p.requires_grad for p in loaded.parameters())
    # a lone safetensors file is self-describing
    alone = ToComBank.from_pretrained(tmp_path / "b" / WEIGHTS_NAME)
    assert alone.config == bank.config and torch.equal(alone.A["q"], bank.A["q"])
    assert (os.stat(tmp_path / "b" / WEIGHTS_NAME).st_mode & 0o777) == 0o644


def test_files_are_plain_safetensors_and_json(bank, tmp_path):
    bank.save_pretrained(tmp_path)
    raw = (tmp_path / WEIGHTS_NAME).read_bytes()
    assert not raw.startswith(b"\x80") and b"PK\x03\x04" not in raw[:8]  # not a pickle / torch zip
    tensors = load_file(tmp_path / WEIGHTS_NAME)  # safetensors alone reads it
    assert set(tensors) == {"A.q", "A.v", "B.q", "B.v"}
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as f:
        meta = f.metadata()
    assert meta["tocom_format_version"] == str(FORMAT_VERSION)
    assert json.loads(meta["tocom_config"])["r_max"] == 5
    json.loads((tmp_path / CONFIG_NAME).read_text())


def test_fp16_save_load(bank, tmp_path):
    half = copy.deepcopy(bank).half()
    half.save_pretrained(tmp_path / "h")
    with safe_open(str(tmp_path / "h" / WEIGHTS_NAME), framework="pt") as f:
        assert f.get_tensor("A.q").dtype == torch.float16
    size = os.path.getsize(tmp_path / "h" / WEIGHTS_NAME)
    assert size < bank.num_parameters() * 2 + 4096
    loaded = ToComBank.from_pretrained(tmp_path / "h")
    assert loaded.A["q"].dtype == torch.float16 and torch.equal(loaded.A["q"], half.A["q"])
    as32 = ToComBank.from_pretrained(tmp_path / "h", dtype=torch.float32)
    assert as32.B["v"].dtype == torch.float32 and torch.equal(as32.B["v"], half.B["v"].float())
    # dtype= on save, the bank itself unchanged
    bank.save_pretrained(tmp_path / "h2", dtype=torch.float16)
    assert bank.A["q"].dtype == torch.float32
    assert ToComBank.from_pretrained(tmp_path / "h2").A["q"].dtype == torch.float16


def test_failed_save_keeps_previous_file(bank, tmp_path, monkeypatch):
    bank.save_pretrained(tmp_path)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        bank.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [WEIGHTS_NAME, CONFIG_NAME]


@pytest.fixture
def saved(bank, tmp_path):
    bank.save_pretrained(tmp_path)
    return tmp_path


def test_truncated_file(saved):
    path = saved / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}.*(truncated|corrupted)"):
        ToComBank.from_pretrained(saved)
    path.write_bytes(data[:5])
    with pytest.raises(ValueError, match=WEIGHTS_NAME):
        ToComBank.from_pretrained(saved)


def test_tampered_tensor_bytes(saved):
    path = saved / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10  # flip one bit in the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}.*checksum"):
        ToComBank.from_pretrained(saved)


def _rewrite(path, tensors=None, metadata=None):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tens = {k: f.get_tensor(k) for k in f.keys()}
    tens = tensors(tens) if tensors else tens
    meta = metadata(meta) if metadata else meta
    # a consistent file (checksum recomputed), so that the check under test is the one that fires
    meta["tocom_sha256"] = _tensors_sha256(tens, meta.get("tocom_config"))
    save_file(tens, str(path), metadata=meta)


def test_missing_tensor(saved):
    _rewrite(saved / WEIGHTS_NAME, tensors=lambda t: {k: v for k, v in t.items() if k != "B.v"})
    with pytest.raises(ValueError, match=r"missing \['B.v'\]"):
        ToComBank.from_pretrained(saved)


def test_shape_mismatch_with_config(saved):
    _rewrite(saved / WEIGHTS_NAME, tensors=lambda t: dict(t, **{"A.q": t["A.q"][:, :, :8].contiguous()}))
    with pytest.raises(ValueError, match=r"A.q has shape \(3, 64, 8\)"):
        ToComBank.from_pretrained(saved / WEIGHTS_NAME)


def test_non_finite_values(saved):
    def poison(t):
        t["B.q"][0, 0, 0] = float("nan")
        return t

    _rewrite(saved / WEIGHTS_NAME, tensors=poison)
    with pytest.raises(ValueError, match="NaN"):
        ToComBank.from_pretrained(saved)


def test_newer_format_version(saved):
    _rewrite(saved / WEIGHTS_NAME, metadata=lambda m: dict(m, tocom_format_version=str(FORMAT_VERSION + 1)))
    with pytest.raises(ValueError, match="newer.*upgrade"):
        ToComBank.from_pretrained(saved)


def test_not_a_bank_file(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="not a ToCom bank"):
        ToComBank.from_pretrained(tmp_path)


def test_config_json_disagrees_with_weights(saved):
    cfg = json.loads((saved / CONFIG_NAME).read_text())
    cfg["r_max"] = 4
    (saved / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"disagrees.*r_max"):
        ToComBank.from_pretrained(saved)


def test_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        ToComBank.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        ToComBank.from_pretrained("./not/here.safetensors")
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        ToComBank.from_pretrained(tmp_path)  # a directory without a bank


# -- every field read from the files is checked --------------------------------------------------


def _edit_config_json(saved, **changes):
    cfg = json.loads((saved / CONFIG_NAME).read_text())
    cfg.update(changes)
    (saved / CONFIG_NAME).write_text(json.dumps(cfg))


@pytest.mark.parametrize("scale", [1e30, 0.2])
def test_scale_in_config_json_must_match_the_embedded_config(saved, scale):
    _edit_config_json(saved, scale=scale)
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}.*(disagrees with the config embedded.*|)scale"):
        ToComBank.from_pretrained(saved)


@pytest.mark.parametrize(
    "field, value",
    [("base_model", "deit_small_patch16_224"), ("pretrained_tag", "x"), ("training_recipe", {"lr": 1.0})],
)
def test_every_config_json_field_must_match_the_embedded_config(saved, field, value):
    _edit_config_json(saved, **{field: value})
    with pytest.raises(ValueError, match=rf"disagrees.*{field}"):
        ToComBank.from_pretrained(saved)


@pytest.mark.parametrize("scale", [1e30, -1.0, 101.0])
def test_scale_out_of_bounds_is_refused(saved, scale):
    with pytest.raises(ValueError, match=r"scale must be a finite number in \[0, 100\]"):
        ToComConfig(embed_dim=64, depth=2, num_heads=2, scale=scale)

    def set_scale(meta):  # both files agree and the checksum is recomputed: only the bound can catch it
        cfg = json.loads(meta["tocom_config"])
        cfg["scale"] = scale
        return dict(meta, tocom_config=json.dumps(cfg, sort_keys=True))

    _rewrite(saved / WEIGHTS_NAME, metadata=set_scale)
    _edit_config_json(saved, scale=scale)
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}.*scale must be a finite number in \[0, 100\]"):
        ToComBank.from_pretrained(saved)
    (saved / CONFIG_NAME).unlink()  # the weights file alone: its embedded config is checked the same way
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}.*scale must be a finite number in \[0, 100\]"):
        ToComBank.from_pretrained(saved)


def test_embedded_config_is_covered_by_the_checksum(saved):
    path = saved / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tens = load_file(str(path))
    cfg = json.loads(meta["tocom_config"])
    cfg["scale"] = 0.5  # in bounds, but not what was saved; the checksum is left as it was
    save_file(tens, str(path), metadata=dict(meta, tocom_config=json.dumps(cfg, sort_keys=True)))
    (saved / CONFIG_NAME).unlink()
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}.*checksum"):
        ToComBank.from_pretrained(saved)


def test_file_without_checksum_is_refused_unless_trusted(saved, bank):
    path = saved / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tens = load_file(str(path))
    meta.pop("tocom_sha256")
    save_file(tens, str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"no 'tocom_sha256' checksum.*trust_unverified=True"):
        ToComBank.from_pretrained(saved)
    with pytest.raises(ValueError, match="tocom_sha256"):
        ToComBank.from_pretrained(path)
    loaded = ToComBank.from_pretrained(saved, trust_unverified=True)
    for k, v in bank.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_banks_the_project_ships_carry_checksums():
    from pathlib import Path

    import tocom_hub

    files = sorted(Path(tocom_hub.__file__).parent.joinpath("demo", "assets").rglob(WEIGHTS_NAME))
    assert files, "the package ships at least the demo bank"
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        assert meta.get("tocom_sha256") == _tensors_sha256(load_file(str(path)), meta["tocom_config"]), path
        ToComBank.from_pretrained(path.parent)  # no trust flag needed


def test_files_whose_checksum_covers_only_the_tensors_still_load(saved, bank):
    """Files written before the checksum covered the embedded config: the tensors are still verified."""
    path = saved / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tens = load_file(str(path))
    save_file(tens, str(path), metadata=dict(meta, tocom_sha256=_tensors_sha256(tens)))
    loaded = ToComBank.from_pretrained(saved)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in bank.state_dict().items())
    tens["A.q"][0, 0, 0] += 1.0
    save_file(tens, str(path), metadata=dict(meta, tocom_sha256=_tensors_sha256(load_file(str(path)))))
    with pytest.raises(ValueError, match="checksum"):
        ToComBank.from_pretrained(saved)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\xff\xfe{\x00}\x00", "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested"),
        (json.dumps({"embed_dim": 64, "depth": 3, "num_heads": 2, "base_model": 5}).encode(), "base_model"),
        (json.dumps({"embed_dim": 64, "depth": 3, "num_heads": 2, "targets": 5}).encode(), "invalid ToCom config"),
        (json.dumps({"embed_dim": 64, "depth": 3, "num_heads": 2, "targets": [["q"]]}).encode(), "targets"),
        (json.dumps({"embed_dim": 64, "depth": 3, "num_heads": 2, "training_recipe": "x"}).encode(), "training_recipe"),
        (json.dumps({"embed_dim": 64, "depth": 3, "num_heads": 2, "format_version": True}).encode(), "format version"),
        (json.dumps({"embed_dim": "64", "depth": 3, "num_heads": 2}).encode(), "embed_dim"),
    ],
)
def test_bad_config_json_names_the_file(saved, content, match):
    (saved / CONFIG_NAME).write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        ToComBank.from_pretrained(saved)
    assert CONFIG_NAME in str(info.value)


def test_bad_embedded_config_names_the_file(saved):
    def nest(meta):
        return dict(meta, tocom_config="[" * 100_000 + "]" * 100_000)

    _rewrite(saved / WEIGHTS_NAME, metadata=nest)
    (saved / CONFIG_NAME).unlink()
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}.*nested"):
        ToComBank.from_pretrained(saved)

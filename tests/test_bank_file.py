"""The bank's weights file (core/bank/file.py): every check on read, atomic writes, checksums, and files of
format 1 (``A`` = up, ``B`` = down), which load under peft's names with the very same deltas."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from bank_helpers import random_groups
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import make_vit

import tocom_hub
from tocom_hub import ToComBank, ToComConfig
from tocom_hub.core.bank.file import tensors_sha256
from tocom_hub.core.bank.module import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME

SHIPPED_BANK = Path(tocom_hub.__file__).parent / "demo" / "assets" / "study" / "bank"


@pytest.fixture(scope="module")
def model():
    return make_vit("cls_token")  # embed 64, depth 3, 2 heads


@pytest.fixture
def bank(model):
    b = ToComBank.for_model(model, r_max=5, rank=2, targets=("q", "v"))
    random_groups(b, seed=1)
    return b


def test_failed_save_keeps_previous_file(bank, tmp_path, monkeypatch):
    bank.save_pretrained(tmp_path)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)  # the disk fills up while the new file is written
    with pytest.raises(OSError, match="disk full"):
        bank.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["README.md", WEIGHTS_NAME, CONFIG_NAME]


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
    meta["tocom_sha256"] = tensors_sha256(tens, meta.get("tocom_config"))
    save_file(tens, str(path), metadata=meta)


def test_missing_tensor(saved):
    _rewrite(saved / WEIGHTS_NAME, tensors=lambda t: {k: v for k, v in t.items() if k != "lora_A.v"})
    with pytest.raises(ValueError, match=r"missing \['lora_A.v'\]"):
        ToComBank.from_pretrained(saved)


def test_shape_mismatch_with_config(saved):
    _rewrite(saved / WEIGHTS_NAME, tensors=lambda t: dict(t, **{"lora_B.q": t["lora_B.q"][:, :, :8].contiguous()}))
    with pytest.raises(ValueError, match=r"lora_B.q has shape \(3, 64, 8\)"):
        ToComBank.from_pretrained(saved / WEIGHTS_NAME)


def test_non_finite_values(saved):
    def poison(t):
        t["lora_A.q"][0, 0, 0] = float("nan")
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
        assert meta.get("tocom_sha256") == tensors_sha256(load_file(str(path)), meta["tocom_config"]), path
        ToComBank.from_pretrained(path.parent)  # no trust flag needed


def test_files_whose_checksum_covers_only_the_tensors_still_load(saved, bank):
    """Files written before the checksum covered the embedded config: the tensors are still verified."""
    path = saved / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tens = load_file(str(path))
    save_file(tens, str(path), metadata=dict(meta, tocom_sha256=tensors_sha256(tens)))
    loaded = ToComBank.from_pretrained(saved)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in bank.state_dict().items())
    tens["lora_B.q"][0, 0, 0] += 1.0
    save_file(tens, str(path), metadata=dict(meta, tocom_sha256=tensors_sha256(load_file(str(path)))))
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


# -- the file's names and format 1 ----------------------------------------------------------------


def _sha256_as_documented(tensors, config_json):
    """The checksum's documented recipe, written out here: names, dtypes, shapes and bytes sorted by name."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(b"tocom_config|" + config_json.encode())
    return h.hexdigest()


def write_format_1(bank, directory):
    """A bank file as tocom-hub wrote it before peft's names (format 1), built here from the layout alone."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for t in bank.targets:
        tensors[f"A.{t}"] = bank.lora_B[t].detach().clone()  # up [depth, d_out, R·h]
        tensors[f"B.{t}"] = bank.lora_A[t].detach().clone()  # down [depth, R·h, d_in]
    config = dict(bank.config.to_dict(), format_version=1)
    config_json = json.dumps(config, sort_keys=True)
    meta = {
        "format": "pt",
        "tocom_format_version": "1",
        "tocom_config": config_json,
        "tocom_sha256": _sha256_as_documented(tensors, config_json),
    }
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata=meta)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    return tensors


def test_saved_file_has_peft_names_and_the_documented_checksum(bank, tmp_path):
    bank.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as f:
        meta, names = f.metadata(), set(f.keys())
    assert meta["tocom_format_version"] == str(FORMAT_VERSION) == "2"
    assert names == {f"{p}.{t}" for p in ("lora_A", "lora_B") for t in bank.targets}
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["format_version"] == 2
    assert meta["tocom_sha256"] == _sha256_as_documented(load_file(str(tmp_path / WEIGHTS_NAME)), meta["tocom_config"])


def test_format_1_file_is_refused(bank, tmp_path):
    """Format 1 (``A`` = up, ``B`` = down) was never published; its files are refused with the version."""
    write_format_1(bank, tmp_path)
    with pytest.raises(ValueError, match=r"unknown bank format version 1; expected one of \(2,\)"):
        ToComBank.from_pretrained(tmp_path)


def test_shipped_bank_is_format_2_with_the_deltas_of_its_raw_tensors():
    """The demo bank ships in the current format: its deltas are the product of the raw file tensors."""
    raw = load_file(str(SHIPPED_BANK / WEIGHTS_NAME))
    assert {k.split(".")[0] for k in raw} == {"lora_A", "lora_B"}
    bank = ToComBank.from_pretrained(SHIPPED_BANK)
    assert bank.config.format_version == 2
    h, s = bank.rank, bank.scale
    for t in bank.targets:
        for b in (0, bank.depth - 1):
            for m, n in [(0, bank.r_max), (bank.r_max, 3), (5, 9)]:
                lo, hi = min(m, n), max(m, n)
                up = raw[f"lora_B.{t}"][b, :, lo * h : hi * h].float()
                down = raw[f"lora_A.{t}"][b, lo * h : hi * h].float()
                expected = (up @ down).mul_((1.0 if n > m else -1.0) * s)
                assert torch.equal(bank.delta(b, t, m, n), expected), (t, b, m, n)


def test_same_tensors_give_the_same_bytes(bank, tmp_path):
    """save_pretrained is byte-reproducible (the safetensors writer orders its metadata by a hash map)."""
    files = []
    for i in range(4):
        bank.save_pretrained(tmp_path / str(i))
        files.append((tmp_path / str(i) / WEIGHTS_NAME).read_bytes())
    ToComBank.from_pretrained(tmp_path / "0").save_pretrained(tmp_path / "again")
    files.append((tmp_path / "again" / WEIGHTS_NAME).read_bytes())
    assert len(set(files)) == 1
    loaded = load_file(str(tmp_path / "0" / WEIGHTS_NAME))
    assert loaded.keys() == bank.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in bank.state_dict().items())

"""The bank's weights file, ``tocom.safetensors``: its tensor names, the checksum, reading with every check,
and atomic, byte-reproducible writing. No pickle anywhere; nothing here imports ``torch.nn``.

Per adapted matrix ``t`` (``"q"``, ``"k"``, ``"v"``, ``"proj"``) the file holds two stacked factors, ``R·h``
inner columns each (group ``i`` at ``[i·h, (i+1)·h)``):

- format 2 (peft's names): ``lora_A.{t}`` the down factor ``[depth, R·h, d_in]``, ``lora_B.{t}`` the up factor
  ``[depth, d_out, R·h]``. (Format 1, with ``B`` / ``A`` for the factors, was never published and is no longer
  read.)

String metadata: ``tocom_format_version``, ``tocom_config`` (the config as JSON) and ``tocom_sha256``, a
SHA-256 over the tensors as named in the file and that config.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ..jsonio import atomic_write_bytes
from .config import (
    CONFIG_NAME,
    FORMAT_VERSION,
    LIBRARY_NAME,
    WEIGHTS_NAME,
    ToComConfig,
    _parse_json_text,
    check_format_version,
)

__all__ = [
    "factor_names",
    "read_bank",
    "read_bank_file",
    "check_tensors",
    "write_bank_file",
    "tensors_sha256",
]

# format version -> (name of the down factor, name of the up factor)
_FACTOR_NAMES = {2: ("lora_A", "lora_B")}


def factor_names(version: int = FORMAT_VERSION) -> Tuple[str, str]:
    """``(down, up)`` tensor-name prefixes of bank file format ``version``."""
    return _FACTOR_NAMES[version]


def tensors_sha256(tensors: Dict[str, torch.Tensor], config_json: Optional[str] = None) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of ``tensors`` (sorted by name), then over the
    embedded config JSON when given (what ``save_pretrained`` writes; files written before the config
    was covered hold the tensor-only digest)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    if config_json is not None:
        h.update(b"tocom_config|" + config_json.encode("utf-8"))
    return h.hexdigest()


def read_bank_file(path: Path, *, trust_unverified: bool = False) -> Tuple[Dict[str, torch.Tensor], ToComConfig, int]:
    """Read ``tocom.safetensors``: ``(tensors as named in the file, embedded config, format version)``.

    Checks the format version and the checksum (a file without one is refused unless
    ``trust_unverified=True``) and validates the embedded config; :func:`check_tensors` checks the rest.
    """
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no ToCom bank file at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers / sizes
        raise ValueError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); it is truncated or "
            f"corrupted — download or save it again"
        ) from None
    version = metadata.get("tocom_format_version")
    if version is None:
        raise ValueError(f"{path}: no 'tocom_format_version' in the safetensors metadata; not a ToCom bank file")
    try:
        version_int = int(version)
    except ValueError:
        raise ValueError(f"{path}: malformed tocom_format_version {version!r}") from None
    check_format_version(version_int, str(path))
    config_json = metadata.get("tocom_config", "")
    expected_sha = metadata.get("tocom_sha256")
    if expected_sha is None:
        if not trust_unverified:
            raise ValueError(
                f"{path}: no 'tocom_sha256' checksum in the safetensors metadata, so neither the tensors nor "
                f"the config can be verified (every bank ToComBank.save_pretrained writes has one; this file "
                f"was written or edited by another tool). Re-save it with ToComBank.save_pretrained, or pass "
                f"trust_unverified=True if you trust where it comes from"
            )
    elif expected_sha not in (tensors_sha256(tensors, config_json), tensors_sha256(tensors)):
        raise ValueError(
            f"{path}: checksum mismatch — the tensors or the embedded config were modified or corrupted "
            f"after the file was written; download or save it again"
        )
    try:
        config = ToComConfig.from_dict(_parse_json_text(config_json, str(path), "embedded 'tocom_config'"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid 'tocom_config' in the safetensors metadata: {e}") from None
    return tensors, config, version_int


def check_tensors(path: Path, tensors: Dict[str, torch.Tensor], config: ToComConfig, version: int) -> None:
    """Names, shapes, dtypes and finiteness of a format-``version`` file's tensors against its config."""
    inner = config.r_max * config.rank
    down, up = factor_names(version)
    expected = {}
    for t in config.targets:
        d_out, d_in = config.target_shape(t)
        expected[f"{up}.{t}"] = (config.depth, d_out, inner)
        expected[f"{down}.{t}"] = (config.depth, inner, d_in)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: tensors do not match the config (targets {config.targets}, format version {version}): "
            f"missing {missing}, unexpected {unexpected}"
        )
    for k, shape in expected.items():
        t = tensors[k]
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{path}: tensor {k} has shape {tuple(t.shape)}, the config (r_max={config.r_max}, "
                f"rank={config.rank}, depth={config.depth}) needs {shape}"
            )
        if not t.dtype.is_floating_point:
            raise ValueError(f"{path}: tensor {k} has dtype {t.dtype}; expected a floating point dtype")
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: tensor {k} contains NaN or inf")


def read_bank(path: Path, *, trust_unverified: bool = False) -> Tuple[Dict[str, torch.Tensor], ToComConfig]:
    """A bank directory (``tocom.safetensors`` + optional ``tocom_config.json``) or a lone weights file:
    ``(tensors under the current names, config)``, every check done (:func:`read_bank_file`, :func:`check_tensors`,
    and ``tocom_config.json`` must say exactly what the checksummed embedded config says)."""
    json_config: Optional[ToComConfig] = None
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} in this directory (is it a ToCom bank?)")
        if (path / CONFIG_NAME).is_file():
            json_config = ToComConfig.from_json_file(path / CONFIG_NAME)
    else:
        weights = path
    tensors, config, version = read_bank_file(weights, trust_unverified=trust_unverified)
    if json_config is not None:
        a, b = json_config.to_dict(), config.to_dict()
        diff = [k for k in a if a[k] != b[k]]
        if diff:
            raise ValueError(
                f"{path / CONFIG_NAME} disagrees with the config embedded in {weights} on {diff}; "
                f"one of the two files was replaced or edited — re-download or re-save the bank"
            )
    check_tensors(weights, tensors, config, version)
    return dict(tensors), config


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def safetensors_bytes(tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> bytes:
    """A safetensors file whose bytes depend only on ``tensors`` and ``metadata``: the header is JSON with sorted
    keys (the safetensors writer keeps the metadata in a hash map, so its key order, and the file's hash, change
    from one process to the next), the tensors follow in name order, the header is padded to 8 bytes."""
    header: Dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset, blobs = 0, []
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name} is {t.dtype}; a bank file holds floating point tensors")
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return b"".join([len(raw).to_bytes(8, "little"), raw, *blobs])


def write_bank_file(path: Path, tensors: Dict[str, torch.Tensor], config: ToComConfig) -> None:
    """Write ``tensors`` (current names) and ``config`` to ``path`` atomically (temporary file + ``os.replace``);
    the same tensors and config always give the same bytes (:func:`safetensors_bytes`)."""
    from ... import __version__

    config_json = json.dumps(config.to_dict(), sort_keys=True)
    metadata = {
        "format": "pt",
        "library": LIBRARY_NAME,
        "library_version": str(__version__),
        "tocom_format_version": str(FORMAT_VERSION),
        "tocom_config": config_json,
        "tocom_sha256": tensors_sha256(tensors, config_json),
    }
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata))

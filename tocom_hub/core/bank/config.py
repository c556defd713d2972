"""The bank's configuration (:class:`ToComConfig`, ``tocom_config.json``) and the small file helpers every
bank file shares: the constants of the on-disk format, strict JSON reading, atomic writes.

A config is validated field by field when it is built, so a config read from a file is checked the
same way as one written in code. ``format_version`` is the version of the file the config came from
(2: peft's names ``lora_A`` = down / ``lora_B`` = up; format 1 was never published and is not read);
new files are always written in :data:`FORMAT_VERSION`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from torch import nn

from ..checks import METHODS, is_int
from ..jsonio import write_json

__all__ = [
    "ToComConfig",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FORMAT_VERSION",
    "FORMAT_VERSIONS",
    "TARGETS",
    "MAX_SCALE",
    "model_dims",
    "LIBRARY_NAME",
]

LIBRARY_NAME = "tocom-hub"  # huggingface_hub library_name (user agent, model cards)
CONFIG_NAME = "tocom_config.json"
WEIGHTS_NAME = "tocom.safetensors"
FORMAT_VERSION = 2  # what save_pretrained writes
FORMAT_VERSIONS = (2,)  # what from_pretrained reads
TARGETS = ("q", "k", "v", "proj")
# largest ToCom scale a bank or apply() accepts: the paper searches s in {0.01 … 0.15}; far beyond
# that the "compensation" replaces the weights rather than correcting them (1e30 overflows fp32)
MAX_SCALE = 100.0
# JSON files we read (configs, registries) are a few KB; nesting deeper than this is not a config
_MAX_JSON_DEPTH = 64

PathLike = Union[str, os.PathLike]


@dataclass
class ToComConfig:
    """Everything needed to rebuild a :class:`ToComBank` and check it against a model.

    Saved as ``tocom_config.json`` (like peft's ``adapter_config.json``) and embedded in the
    safetensors metadata, so a lone ``tocom.safetensors`` file is self-describing.

    Args:
        embed_dim: token width ``d`` of the backbone (``blk.attn.qkv.in_features``).
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        r_max: ``R``, the largest compression degree the bank covers (groups ``0 → 1 … R-1 → R``).
        rank: LoRA rank ``h`` of every group.
        targets: weight matrices the bank adapts, any of ``"q"``, ``"k"``, ``"v"``, ``"proj"``.
        scale: default ``s`` used when :func:`tocom_hub.apply` gets no ``scale``.
        method: token reduction the bank was trained for, ``"tome"`` or ``"evit"``.
        dense: trained in dense mode (``tocom_hub.patch(model, dense=True)``: every patch kept,
            ``dense_ratio · r`` tokens share an MLP); such a bank is refused on a regular model and back.
        dense_ratio: tokens per unit of ``r`` in dense mode (``None`` for a regular bank).
        attn_dim: width of q/k/v (``num_heads · head_dim``); ``None`` means ``embed_dim``.
        base_model: timm architecture name of the backbone, e.g. ``"deit_base_patch16_224"``.
        pretrained_tag: timm pretrained tag of the backbone, e.g. ``"fb_in1k"``.
        format_version: version of the bank file format (see :data:`FORMAT_VERSIONS`).
        training_recipe: free-form facts about how the bank was trained (for the model card).
        eval_results: free-form evaluation table (for the model card).

    Example::

        config = ToComConfig(embed_dim=768, depth=12, num_heads=12, r_max=16, rank=2)
        bank = ToComBank(config)
        config.save_pretrained("out/bank")  # tocom_config.json
    """

    embed_dim: int
    depth: int
    num_heads: int
    r_max: int = 16
    rank: int = 2
    targets: Tuple[str, ...] = ("q", "v")
    scale: float = 0.1
    method: str = "tome"
    dense: bool = False
    dense_ratio: Optional[int] = None
    attn_dim: Optional[int] = None
    base_model: Optional[str] = None
    pretrained_tag: Optional[str] = None
    format_version: int = FORMAT_VERSION
    training_recipe: Optional[Dict[str, Any]] = field(default=None)
    eval_results: Optional[Dict[str, Any]] = field(default=None)

    def __post_init__(self) -> None:
        for name in ("embed_dim", "depth", "num_heads", "r_max", "rank"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"ToComConfig.{name} must be a positive int; got {value!r}")
        if self.attn_dim is not None and (not is_int(self.attn_dim) or self.attn_dim < 1):
            raise ValueError(f"ToComConfig.attn_dim must be a positive int or None; got {self.attn_dim!r}")
        if isinstance(self.targets, str):
            raise ValueError(f"ToComConfig.targets must be a sequence such as ('q', 'v'); got {self.targets!r}")
        self.targets = tuple(self.targets)
        bad = [t for t in self.targets if t not in TARGETS]
        if not self.targets or bad or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"ToComConfig.targets must be distinct names from {TARGETS}; got {self.targets!r}")
        if self.method not in METHODS:
            raise ValueError(f"ToComConfig.method must be one of {METHODS}; got {self.method!r}")
        if not isinstance(self.dense, bool):
            raise ValueError(f"ToComConfig.dense must be true or false; got {self.dense!r}")
        ratio_ok = is_int(self.dense_ratio) and self.dense_ratio > 0
        if self.dense != (self.dense_ratio is not None) or (self.dense and not ratio_ok):
            raise ValueError(
                f"ToComConfig.dense_ratio must be a positive int for a dense bank and None otherwise; "
                f"got dense={self.dense!r}, dense_ratio={self.dense_ratio!r}"
            )
        if (
            isinstance(self.scale, bool)
            or not isinstance(self.scale, (int, float))
            or not math.isfinite(self.scale)
            or not 0.0 <= self.scale <= MAX_SCALE
        ):
            raise ValueError(f"ToComConfig.scale must be a finite number in [0, {MAX_SCALE:g}]; got {self.scale!r}")
        self.scale = float(self.scale)
        for name in ("base_model", "pretrained_tag"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or len(value) > 256):
                raise ValueError(f"ToComConfig.{name} must be a timm name (a non-empty string) or None; got {value!r}")
        if self.training_recipe is not None and not isinstance(self.training_recipe, dict):
            raise ValueError(
                f"ToComConfig.training_recipe must be a JSON object or None; got {type(self.training_recipe).__name__}"
            )
        if self.eval_results is not None and not isinstance(self.eval_results, (dict, list)):
            raise ValueError(
                f"ToComConfig.eval_results must be a JSON object, a list or None; "
                f"got {type(self.eval_results).__name__}"
            )
        check_format_version(self.format_version, "ToComConfig.format_version")

    # -- shapes ------------------------------------------------------------------------------------
    @property
    def qkv_dim(self) -> int:
        """Width of each of q / k / v (``attn_dim`` or ``embed_dim``)."""
        return self.attn_dim if self.attn_dim is not None else self.embed_dim

    def target_shape(self, target: str) -> Tuple[int, int]:
        """``(d_out, d_in)`` of the weight matrix ``target`` adapts."""
        if target == "proj":
            return self.embed_dim, self.qkv_dim
        return self.qkv_dim, self.embed_dim

    @property
    def base_model_id(self) -> Optional[str]:
        """``"architecture.tag"`` (timm's pretrained name) or ``None`` when unknown."""
        if self.base_model is None:
            return None
        return f"{self.base_model}.{self.pretrained_tag}" if self.pretrained_tag else self.base_model

    # -- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ToComConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a ToCom config must be a JSON object; got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            warnings.warn(f"ignoring unknown ToCom config keys {unknown} (written by a newer tocom-hub?)", stacklevel=2)
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in d and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(f"ToCom config lacks required keys {missing}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def save_pretrained(self, save_directory: PathLike) -> None:
        """Write ``tocom_config.json`` into ``save_directory`` (atomically)."""
        write_json(Path(save_directory) / CONFIG_NAME, self.to_dict(), sort_keys=True, default=None)

    @classmethod
    def from_json_file(cls, path: PathLike) -> "ToComConfig":
        data = _read_json_file(path, what="ToCom config")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: invalid ToCom config: {e}") from None


def check_format_version(version: Any, where: str) -> int:
    """``version`` as an int when this tocom-hub reads it, else a ``ValueError`` that says what to do."""
    if is_int(version) and version > FORMAT_VERSION:
        raise ValueError(
            f"{where}: bank format version {version} is newer than this tocom-hub supports ({FORMAT_VERSION}); "
            f"upgrade tocom-hub"
        )
    if not is_int(version) or version not in FORMAT_VERSIONS:
        raise ValueError(f"{where}: unknown bank format version {version!r}; expected one of {FORMAT_VERSIONS}")
    return version


def model_dims(model: nn.Module) -> Dict[str, int]:
    """``embed_dim``, ``attn_dim``, ``depth``, ``num_heads`` of a model of a supported family.

    q and v are found where the model's family says (fused ``attn.qkv`` rows or separate ``q_proj`` /
    ``v_proj``). Raises ``TypeError`` naming the model class when the shapes differ between blocks, when
    v is narrower than q (grouped k/v heads: a bank's v factors are q-sized) or the family is unsupported.
    """
    from ..families import find_family  # the families import timm's model modules: only when needed

    name = type(model).__name__
    family = find_family(model)
    shapes = set()
    blocks = family.model_blocks(model)
    for i, blk in enumerate(blocks):
        where = family.qv(blk)
        rows = {t: (m.out_features if stop is None else stop) - start for t, (m, start, stop) in where.items()}
        q_in = where["q"][0].in_features
        proj = where["proj"][0]
        if rows["v"] != rows["q"]:
            raise TypeError(
                f"{name}: block {i} has grouped k/v heads (v is {rows['v']} wide, q {rows['q']}); a ToCom bank "
                f"needs q and v of one width"
            )
        shapes.add(
            (
                q_in,
                rows["q"],
                int(getattr(getattr(blk, "attn", blk), "num_heads", 0)),
                proj.in_features,
                proj.out_features,
            )
        )
    if len(shapes) != 1:
        raise TypeError(f"{name}: attention shapes differ between blocks ({sorted(shapes)}); not supported")
    embed_dim, attn_dim, num_heads, proj_in, proj_out = shapes.pop()
    if proj_in != attn_dim or proj_out != embed_dim:
        raise TypeError(f"{name}: attn.proj is {proj_in}→{proj_out}, expected {attn_dim}→{embed_dim}")
    return {"embed_dim": embed_dim, "attn_dim": attn_dim, "depth": len(blocks), "num_heads": num_heads}


# ---------------------------------------------------------------------------------------------------
# file helpers


def _json_depth_ok(obj: Any, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return True


def _parse_json_text(text: Union[str, bytes], where: str, what: str) -> Any:
    """``json.loads`` with errors that name ``where``: not UTF-8, not JSON, nested deeper than a config."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{where}: the {what} is not UTF-8 text ({e.reason} at byte {e.start}); expected a JSON file"
            ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: the {what} is not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{where}: the {what} is nested too deeply; not a valid {what}") from None
    if not _json_depth_ok(data, _MAX_JSON_DEPTH):
        raise ValueError(f"{where}: the {what} is nested deeper than {_MAX_JSON_DEPTH} levels; not a valid {what}")
    return data


def _read_json_file(path: PathLike, *, what: str, max_bytes: int = 16 << 20) -> Any:
    """Read a small JSON file (a config or a registry) with errors that name the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise ValueError(f"cannot read the {what} {path}: {e.strerror or e}") from None
    if len(raw) > max_bytes:
        raise ValueError(f"{path}: the {what} is larger than {max_bytes >> 20} MB; not a valid {what}")
    return _parse_json_text(raw, str(path), what)

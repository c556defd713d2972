"""Export a patched model at a fixed ``r`` (its ToCom bank merged in) to ONNX or a ``torch.export`` program.

Token merging / pruning changes the number of tokens from block to block, but at a fixed ``r`` and a
fixed input shape every shape is known in advance, so the whole patched forward — bipartite matching,
the weighted merge, proportional attention, EViT's top-k — traces into one static graph. The bank adds
nothing to that graph: :func:`tocom_hub.apply` writes ``W₀ + s·Δ(source_r → target_r)`` into the
``qkv`` weights, and the exported weights are those. Example::

    from tocom_hub.tools.export import export_model
    export_model(model, "deit-r8.onnx", source_r=0, target_r=8, bank="out/bank")            # ONNX
    export_model(model, "deit.pt2", source_r=0, target_r=[0, 8, 16], bank=bank, format="torch")
    # -> deit-r0.pt2, deit-r8.pt2, deit-r16.pt2 (one file per r)

ONNX goes through the dynamo exporter (``torch.onnx.export(..., dynamo=True)``; needs ``onnx`` and
``onnxscript``: ``pip install "tocom-hub[export]"``), ``format="torch"`` through ``torch.export.export``
and ``torch.export.save`` (load with ``torch.export.load(path).module()``). The input shape is static
(``batch_size`` × 3 × the model's image size): export one file per batch size you serve. The model you
pass is left exactly as it was (patch state, ``r``, bank, train/eval mode).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, List, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from ..core.bank.module import ToComBank
from ..core.checks import METHODS, is_int
from ..core.compensation.api import apply, get_compensation
from ..core.patch import get_method, patch, set_r
from ..core.preserve import preserved
from .images import model_img_size

__all__ = ["FORMATS", "ExportedModel", "export_model", "export_paths", "run_exported", "read_recipe"]

FORMATS = {"onnx": ".onnx", "torch": ".pt2"}
METADATA_KEY = "tocom_hub"  # ONNX metadata_props key / torch.export extra file holding the recipe (JSON)


class ExportedModel(NamedTuple):
    """One file :func:`export_model` wrote: its ``path``, ``format``, the pair it was exported at and
    ``max_abs_diff`` (largest |exported − eager| on the example batch; ``None`` without ``verify``)."""

    path: Path
    format: str
    source_r: int
    target_r: int
    max_abs_diff: Optional[float]


def export_paths(path: Union[str, os.PathLike], targets: Sequence[int], format: str) -> List[Path]:
    """The file for every target ``r``: ``path`` itself for one; for several, ``path`` with ``{r}``
    filled in, else ``-r<r>`` before the suffix (``model.onnx`` → ``model-r0.onnx``, ``model-r8.onnx``).
    A path without a suffix gets the format's (``.onnx`` / ``.pt2``)."""
    text = os.fspath(path)
    if "{r}" not in text and not Path(text).suffix:
        text += FORMATS[format]
    if "{r}" in text:
        return [Path(text.replace("{r}", str(r))) for r in targets]
    if len(targets) == 1:
        return [Path(text)]
    p = Path(text)
    return [p.with_name(f"{p.stem}-r{r}{p.suffix}") for r in targets]


def _check_args(model, targets, source_r, format, batch_size, bank, method) -> List[int]:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}; got {format!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module; got {type(model).__name__}")
    if get_compensation(model) is not None:
        raise ValueError("the model already carries a ToCom bank; call tocom_hub.remove(model) and pass bank=")
    rs = [targets] if is_int(targets) else list(targets) if isinstance(targets, (list, tuple, range)) else None
    if not rs or not all(is_int(r) and r >= 0 for r in rs):
        raise ValueError(f"target_r must be a non-negative int or a non-empty list of them; got {targets!r}")
    if len(set(rs)) != len(rs):
        raise ValueError(f"target_r lists an r twice: {rs}")
    if not is_int(source_r) or source_r < 0:
        raise ValueError(f"source_r must be a non-negative int; got {source_r!r}")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    if method is not None and method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if bank is not None:
        for r, name in [(source_r, "source_r"), *((r, "target_r") for r in rs)]:
            if r > bank.r_max:
                raise ValueError(f"{name}={r} is outside the bank's range 0…{bank.r_max}")
    return [int(r) for r in rs]


def _configure(model: nn.Module, bank: Optional[ToComBank], source_r: int, r: int, method, scale, ignore_base_model):
    """Put ``model`` (inside :func:`preserved`) at ``r`` with the bank merged at ``source_r → r``."""
    model.eval()
    if bank is not None:
        apply(model, source_r, r, bank=bank, scale=scale, method=method, ignore_base_model=ignore_base_model)
    else:
        patch(model, method=method or get_method(model) or "tome")
        set_r(model, r)


def _recipe(model: nn.Module, bank: Optional[ToComBank], source_r: int, r: int, x: torch.Tensor) -> str:
    st = get_compensation(model)
    return json.dumps(
        {
            "method": get_method(model),
            "source_r": source_r if bank is not None else None,
            "target_r": r,
            "scale": st.scale if st is not None else None,
            "bank": bank.config.base_model_id if bank is not None else None,
            "input_shape": list(x.shape),
        }
    )


def _export_onnx(model: nn.Module, x: torch.Tensor, path: Path, opset: Optional[int], recipe: str) -> None:
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency; fail early with a clear hint)
    except ImportError:
        raise ImportError('ONNX export needs onnx and onnxscript: pip install "tocom-hub[export]"') from None
    kwargs = {} if opset is None else {"opset_version": opset}
    program = torch.onnx.export(
        model, (x,), dynamo=True, input_names=["images"], output_names=["logits"], verbose=False, **kwargs
    )
    program.model.metadata_props[METADATA_KEY] = recipe
    program.save(str(path))


def _export_torch(model: nn.Module, x: torch.Tensor, path: Path, recipe: str) -> None:
    program = torch.export.export(model, (x,))
    torch.export.save(program, str(path), extra_files={METADATA_KEY: recipe})


def run_exported(path: Union[str, os.PathLike], x: torch.Tensor) -> torch.Tensor:
    """Run an exported file on ``x``: ``.onnx`` through onnxruntime (CPU), ``.pt2`` through
    ``torch.export.load``. For checks; serve the files with your runtime of choice."""
    path = Path(path)
    if path.suffix == ".onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError('running an ONNX file needs onnxruntime: pip install "tocom-hub[export]"') from None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])
    with torch.inference_mode():
        return torch.export.load(str(path)).module()(x)


def export_model(
    model: nn.Module,
    path: Union[str, os.PathLike],
    source_r: int = 0,
    target_r: Union[int, Sequence[int]] = 0,
    bank: Union[ToComBank, str, os.PathLike, None] = None,
    *,
    format: str = "onnx",
    scale: Optional[float] = None,
    method: Optional[str] = None,
    batch_size: int = 1,
    input_size: Optional[Sequence[int]] = None,
    opset: Optional[int] = None,
    verify: bool = True,
    ignore_base_model: bool = False,
) -> List[ExportedModel]:
    """Write ``model`` patched at every ``target_r``, its bank merged at ``source_r → target_r``, to one file
    per ``r`` (see :func:`export_paths`); returns an :class:`ExportedModel` per file.

    Args:
        model: a timm ViT (not carrying a bank; patched or not). Left as it was.
        path: the output file (``{r}`` in it is replaced by each r; else ``-r<r>`` is added for several r).
        source_r / target_r: the pair(s) the bank is merged at; ``target_r`` an int or a list.
        bank: a :class:`~tocom_hub.ToComBank`, a bank path / Hub id, or ``None`` (plain ToMe / EViT at ``target_r``).
        format: ``"onnx"`` (dynamo exporter) or ``"torch"`` (``torch.export`` ``.pt2``).
        scale / method / ignore_base_model: as in :func:`tocom_hub.apply` (method: without a bank, the model's
            patch method, else ToMe).
        batch_size / input_size: the static input shape ``[batch_size, 3, H, W]`` (default: the model's size).
        opset: ONNX opset (default: the exporter's).
        verify: run the written file on a random example batch and record the largest difference to eager.
    """
    if bank is not None and not isinstance(bank, ToComBank):
        from ..hub.load import load_bank

        bank = load_bank(bank)
    rs = _check_args(model, target_r, source_r, format, batch_size, bank, method)
    paths = export_paths(path, rs, format)
    for p in paths:
        if p.is_dir():
            raise IsADirectoryError(f"{p} is a directory; pass a file name such as model{FORMATS[format]}")
    param = next(model.parameters())
    size = tuple(input_size) if input_size is not None else model_img_size(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, *size, generator=gen).to(param.device, param.dtype)
    for r in rs:  # every r the model (and bank) can take, before any file is written
        with preserved(model):
            _configure(model, bank, source_r, r, method, scale, ignore_base_model)
    written: List[ExportedModel] = []
    for r, p in zip(rs, paths):
        with preserved(model):
            _configure(model, bank, source_r, r, method, scale, ignore_base_model)
            p.parent.mkdir(parents=True, exist_ok=True)
            recipe = _recipe(model, bank, source_r, r, x)
            if format == "onnx":
                _export_onnx(model, x, p, opset, recipe)
            else:
                _export_torch(model, x, p, recipe)
            diff = None
            if verify:
                with torch.inference_mode():
                    ref = model(x)
                out = run_exported(p, x.cpu() if format == "onnx" else x)
                diff = float((out.to(ref.device, torch.float32) - ref.float()).abs().max())
        written.append(ExportedModel(p, format, source_r if bank is not None else 0, r, diff))
    return written


def read_recipe(path: Union[str, os.PathLike]) -> Any:
    """The recipe (method, source / target r, scale, input shape) stored in an exported file."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props[METADATA_KEY])
    extra = {METADATA_KEY: ""}
    torch.export.load(str(path), extra_files=extra)
    return json.loads(extra[METADATA_KEY])

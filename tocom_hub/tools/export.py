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
(``batch_size`` × 3 × the model's image size, or the shapes of an ``example`` input such as a NaFlex patch
dict): export one file per batch size you serve. The model you pass is left exactly as it was (patch state,
``r``, bank, train/eval mode).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Union

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
Example = Union[torch.Tensor, Dict[str, torch.Tensor]]  # images, or a dict of tensors (a NaFlex patch dict)
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


def _shapes(x: Example) -> Any:
    return {k: list(v.shape) for k, v in x.items()} if isinstance(x, dict) else list(x.shape)


def _recipe(model: nn.Module, bank: Optional[ToComBank], source_r: int, r: int, x: Example) -> str:
    st = get_compensation(model)
    return json.dumps(
        {
            "method": get_method(model),
            "source_r": source_r if bank is not None else None,
            "target_r": r,
            "scale": st.scale if st is not None else None,
            "bank": bank.config.base_model_id if bank is not None else None,
            "input_shape": _shapes(x),
        }
    )


@contextlib.contextmanager
def _inference_params(model: nn.Module) -> Iterator[None]:
    """Parameters with ``requires_grad=False`` while tracing (restored after). An SDPA mask built from
    parameters that require grad (BEiT's and relpos's relative-position bias) breaks the ONNX decomposition:
    it views the attention output with strides the decomposed kernel does not give (``Cannot view a tensor``)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class _DictInput(nn.Module):
    """``model(dict(zip(keys, tensors)))``: the ONNX exporter takes a trailing dict argument for keyword
    arguments, so a dict input (a NaFlex patch dict) goes in as one named graph input per key."""

    def __init__(self, model: nn.Module, keys: List[str]) -> None:
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(dict(zip(self.keys, tensors)))


def _export_onnx(model: nn.Module, x: Example, path: Path, opset: Optional[int], recipe: str) -> None:
    """The dynamo exporter's graph, checked by ``onnx.checker``. Its graph optimizer can write an invalid
    graph (Gemma-4's clippable q/k/v linears: a fused Clip's bound is missing, "input … is not output of any
    previous nodes"); the graph before the optimizer is written then (onnxruntime optimizes at load time)."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency; fail early with a clear hint)
    except ImportError:
        raise ImportError('ONNX export needs onnx and onnxscript: pip install "tocom-hub[export]"') from None
    kwargs = {} if opset is None else {"opset_version": opset}
    names, args = (list(x), tuple(x.values())) if isinstance(x, dict) else (["images"], (x,))
    traced = _DictInput(model, names).eval() if isinstance(x, dict) else model  # (the model is in eval mode)

    def unoptimized():
        program = torch.onnx.export(
            traced,
            args,
            dynamo=True,
            input_names=names,
            output_names=["logits"],
            verbose=False,
            optimize=False,
            **kwargs,
        )
        program.model.metadata_props[METADATA_KEY] = recipe
        return program

    program = unoptimized()
    raw = program.model.clone() if hasattr(program.model, "clone") else None  # shares the tensors (onnx_ir)
    program.optimize()  # what torch.onnx.export(optimize=True) runs
    for _attempt in ("optimized", "unoptimized"):
        program.save(str(path))
        try:
            onnx.checker.check_model(str(path))
            return
        except onnx.checker.ValidationError as e:
            error = str(e).strip().splitlines()[0]
        if raw is not None:
            program.model = raw
        else:
            program = unoptimized()
    path.unlink()
    raise RuntimeError(f"the ONNX exporter wrote an invalid graph for {type(model).__name__}: {error}")


def _export_torch(model: nn.Module, x: Example, path: Path, recipe: str) -> None:
    program = torch.export.export(model, (x,))
    torch.export.save(program, str(path), extra_files={METADATA_KEY: recipe})


def run_exported(path: Union[str, os.PathLike], x: Example) -> torch.Tensor:
    """Run an exported file on ``x`` (images, or the dict the file was exported with): ``.onnx`` through
    onnxruntime (CPU), ``.pt2`` through ``torch.export.load``. For checks; serve the files with your
    runtime of choice."""
    path = Path(path)
    if path.suffix == ".onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError('running an ONNX file needs onnxruntime: pip install "tocom-hub[export]"') from None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        if isinstance(x, dict):  # the graph's inputs are named by the keys (an unused one may be dropped)
            feed = {i.name: x[i.name].detach().cpu().numpy() for i in session.get_inputs()}
        else:
            feed = {session.get_inputs()[0].name: x.detach().cpu().numpy()}
        return torch.from_numpy(session.run(None, feed)[0])
    with torch.inference_mode():
        return torch.export.load(str(path)).module()(x)


def _example(model: nn.Module, example: Optional[Example], batch_size: int, input_size) -> Example:
    """The traced input: ``example`` (checked) or random images ``[batch_size, 3, H, W]``."""
    if example is None:
        param = next(model.parameters())
        size = tuple(input_size) if input_size is not None else model_img_size(model)
        gen = torch.Generator().manual_seed(0)
        return torch.randn(batch_size, 3, *size, generator=gen).to(param.device, param.dtype)
    if input_size is not None:
        raise ValueError("pass input_size or example, not both (the example's shapes are the file's)")
    tensors = list(example.values()) if isinstance(example, dict) else [example]
    if not tensors or not all(isinstance(t, torch.Tensor) and t.ndim >= 1 for t in tensors):
        raise TypeError("example must be a tensor or a non-empty dict of tensors (e.g. a NaFlex patch dict)")
    if {t.shape[0] for t in tensors} != {batch_size}:
        raise ValueError(f"example batch {[t.shape[0] for t in tensors]} != batch_size={batch_size}")
    embeds = getattr(model, "embeds", None)
    if isinstance(example, dict) and getattr(embeds, "pos_embed_type", "none") != "none":
        if not getattr(embeds, "pos_embed_use_grid_sample", False):
            raise ValueError(
                f"{type(model).__name__}'s patch-dict path sizes its position embedding per image on the host "
                "(.item()), which no static graph holds; build it with pos_embed_use_grid_sample=True to export it"
            )
    return example


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
    example: Optional[Example] = None,
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
        example: the input to trace and verify with instead of random images (its shapes are the file's; its
            batch must be ``batch_size``; no ``input_size``): a tensor, or a dict of tensors passed as the
            model's first argument, e.g. a NaFlex patch dict (``patches``, ``patch_coord``, ``patch_valid``).
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
    x = _example(model, example, batch_size, input_size)
    for r in rs:  # every r the model (and bank) can take, before any file is written
        with preserved(model):
            _configure(model, bank, source_r, r, method, scale, ignore_base_model)
    written: List[ExportedModel] = []
    for r, p in zip(rs, paths):
        with preserved(model):
            _configure(model, bank, source_r, r, method, scale, ignore_base_model)
            p.parent.mkdir(parents=True, exist_ok=True)
            recipe = _recipe(model, bank, source_r, r, x)
            with _inference_params(model):
                if format == "onnx":
                    _export_onnx(model, x, p, opset, recipe)
                else:
                    _export_torch(model, x, p, recipe)
            diff = None
            if verify:
                with torch.inference_mode():
                    ref = model(x)
                out = run_exported(p, x)
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

"""What a ToCom server serves and how: :class:`ServeConfig` (validated, picklable: Ray ships it to every
replica) and :func:`load_served_model` (the model, its bank and the image transform, built in the replica)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Union

from ..core.checks import METHODS, is_int

__all__ = ["ServeConfig", "ServedModel", "load_served_model", "DEMO"]

DEMO = "demo"  # the embedded study demo: fine-tuned at r = 0, its ToCom bank, per-r accuracy measured

ModelSpec = Union[str, Callable[[], Any]]


@dataclass
class ServeConfig:
    """Settings of a served model. Example::

        ServeConfig(model="demo", budget_ms=60)                               # adaptive r, demo bank
        ServeConfig(model="out/finetune-r0", bank="org/bank", budget_ms=40, max_batch_size=8)
        ServeConfig(model="demo", fixed_r=16)                                  # no controller: always r = 16

    Args:
        model: ``"demo"`` (the embedded study demo model fine-tuned at r = 0 with its bank, offline), any
            ``NAME_OR_PATH`` :func:`tocom_hub.tools.models.load_model` takes (timm name, saved model folder,
            finetune output), or a zero-argument callable returning an ``nn.Module`` (custom loading).
        model_kwargs / pretrained / checkpoint: for :func:`~tocom_hub.tools.models.load_model`.
        bank: a bank folder / file or Hub id (the demo's own by default for ``"demo"``); ``None``: plain ToMe / EViT.
        no_bank: serve without a bank even for ``"demo"`` (its r still switches).
        source_r / scale / method: as in :func:`tocom_hub.apply` (default: the demo's / the bank's).
        budget_ms: latency budget (p99) of a request inside the replica (queueing + batch forward), ms.
        control_fraction: the controller keeps the *median* latency of recent batches within
            ``control_fraction × budget_ms`` (default 0.5): it reacts to a median, so the tail needs room.
        fixed_r: serve at this r only (no controller); ``None``: adaptive.
        r_values: the r the controller may pick (default: the bank's ``0 … R``).
        max_batch_size / batch_wait_timeout_s: ``@serve.batch`` settings; the controller is calibrated at
            ``max_batch_size``.
        target / window / patience_down: :class:`~tocom_hub.LatencyController` settings, counted in batches
            (default 0.9, 3, 8: up after the median of 3 batches, down after 8 calm batches in a row).
        calibrate_iters: timed calibration forwards per r.
        top_k: classes returned per image. max_bytes: largest request body accepted.
        max_pixels: largest decoded image (width × height). crop_pct: eval transform crop (default: the
            model's; ``1.0`` for the demo, as it was evaluated).
        threads: torch CPU threads (``torch.set_num_threads``, process-wide) when the model loads; ``None``: leave
            them (a Ray replica gets ``OMP_NUM_THREADS`` from its ``num_cpus``).
        device: ``"cpu"`` / ``"cuda"`` (default cpu).
        labels: class names returned next to each index (default: none, ``"label": null``).
    """

    model: ModelSpec = DEMO
    model_kwargs: Optional[Dict[str, Any]] = None
    pretrained: bool = False
    checkpoint: Optional[str] = None
    bank: Optional[str] = None
    no_bank: bool = False
    source_r: Optional[int] = None
    scale: Optional[float] = None
    method: Optional[str] = None
    budget_ms: float = 100.0
    control_fraction: float = 0.5
    fixed_r: Optional[int] = None
    r_values: Optional[Sequence[int]] = None
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.005
    target: float = 0.9
    window: int = 3
    patience_down: int = 8
    calibrate_iters: int = 5
    top_k: int = 5
    max_bytes: int = 4 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    crop_pct: Optional[float] = None
    threads: Optional[int] = None
    device: str = "cpu"
    labels: Optional[Sequence[str]] = field(default=None)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line reason for any setting out of range."""
        if not (isinstance(self.model, str) and self.model) and not callable(self.model):
            raise ValueError(f"model must be a name / path or a callable returning a model; got {self.model!r}")
        if (
            isinstance(self.budget_ms, bool)
            or not isinstance(self.budget_ms, (int, float))
            or not (math.isfinite(self.budget_ms) and self.budget_ms > 0)
        ):
            raise ValueError(f"budget_ms must be a positive number of milliseconds; got {self.budget_ms!r}")
        for name, low in (
            ("max_batch_size", 1),
            ("window", 1),
            ("patience_down", 1),
            ("calibrate_iters", 1),
            ("top_k", 1),
            ("max_bytes", 1),
            ("max_pixels", 1),
        ):
            v = getattr(self, name)
            if not is_int(v) or v < low:
                raise ValueError(f"{name} must be an int >= {low}; got {v!r}")
        if self.threads is not None and (not is_int(self.threads) or self.threads < 1):
            raise ValueError(f"threads must be a positive int or None; got {self.threads!r}")
        if not (isinstance(self.batch_wait_timeout_s, (int, float)) and 0 <= self.batch_wait_timeout_s <= 10):
            raise ValueError(f"batch_wait_timeout_s must be in [0, 10] s; got {self.batch_wait_timeout_s!r}")
        if not (isinstance(self.control_fraction, (int, float)) and 0 < self.control_fraction <= 1):
            raise ValueError(f"control_fraction must be in (0, 1]; got {self.control_fraction!r}")
        if not (isinstance(self.target, (int, float)) and 0 < self.target <= 1):
            raise ValueError(f"target must be in (0, 1]; got {self.target!r}")
        for name in ("source_r", "fixed_r"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 0):
                raise ValueError(f"{name} must be a non-negative int or None; got {v!r}")
        if self.r_values is not None:
            rs = list(self.r_values)
            if not rs or not all(is_int(r) and r >= 0 for r in rs):
                raise ValueError(f"r_values must be a non-empty list of non-negative ints; got {self.r_values!r}")
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {self.method!r}")
        if self.crop_pct is not None and not (isinstance(self.crop_pct, (int, float)) and 0 < self.crop_pct <= 1):
            raise ValueError(f"crop_pct must be in (0, 1]; got {self.crop_pct!r}")
        if self.no_bank and self.bank is not None:
            raise ValueError("bank= and no_bank=True contradict each other")

    def describe(self) -> Dict[str, Any]:
        """The settings as JSON-ready values (a callable model by its name)."""
        d = asdict(self)
        if callable(self.model):
            d["model"] = getattr(self.model, "__qualname__", repr(self.model))
        return d


@dataclass
class ServedModel:
    """What a replica runs: the (unpatched) model, its bank, the pair settings and the image transform."""

    model: Any
    bank: Any
    source_r: int
    scale: Optional[float]
    method: str
    transform: Callable
    info: Dict[str, Any]


def _bank(spec: Optional[str]):
    from ..hub.load import load_bank

    return None if spec is None else load_bank(spec)


def load_served_model(cfg: ServeConfig) -> ServedModel:
    """Build the model, bank and transform ``cfg`` names (on ``cfg.device``, eval mode, unpatched)."""
    import torch

    from ..tools.images import eval_transform

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    source_r, scale, crop_pct = cfg.source_r, cfg.scale, cfg.crop_pct
    if callable(cfg.model):
        made = cfg.model()
        model, info = (made if isinstance(made, tuple) else (made, {}))[:2]
        info = dict(info, name=getattr(cfg.model, "__qualname__", "callable"))
        bank = None if cfg.no_bank else _bank(cfg.bank)
    elif cfg.model == DEMO:
        from ..demo import demo_bank_path, demo_info, load_demo_model

        demo = demo_info()
        source_r = 0 if source_r is None else source_r
        model = load_demo_model(source_r).model
        bank = None if cfg.no_bank else _bank(cfg.bank or demo_bank_path())
        if scale is None and bank is not None and cfg.bank is None:
            scale = float(demo["scale"][str(source_r)])
        crop_pct = 1.0 if crop_pct is None else crop_pct
        info = {"name": DEMO, "model": demo["model"], "task": demo["task"], "R": demo["R"]}
    else:
        from ..tools.models import load_model

        model, info = load_model(
            cfg.model, model_kwargs=cfg.model_kwargs, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint
        )
        bank = None if cfg.no_bank else _bank(cfg.bank)
        if source_r is None:
            source_r = int(info.get("source_r") or 0)
    method = cfg.method or (bank.method if bank is not None else "tome")
    model = model.to(cfg.device).eval()
    if bank is not None:
        bank = bank.to(cfg.device)
    transform, _ = eval_transform(model, crop_pct=crop_pct)
    return ServedModel(model, bank, int(source_r or 0), scale, method, transform, info)

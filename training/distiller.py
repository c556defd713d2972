"""The module ``distill.py`` trains: the bank plus the frozen backbone it is plugged into, and its losses.

One frozen, token-reduced backbone serves as both teacher and student (ToCom paper, §4.2 /
Algorithm 1); :class:`Distiller` runs both roles through the same patched forward, :func:`kd_loss` is
the distillation loss and :func:`heldout_eval` the held-out KL without and with the bank.
"""

from __future__ import annotations

import statistics
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import tocom_hub
from tocom_hub.core.bank.module import ToComBank
from tocom_hub.core.compensation import api as compensate

__all__ = ["Distiller", "kd_loss", "heldout_eval"]


class Distiller(nn.Module):
    """The bank (trainable, a submodule) plus the frozen backbone it is plugged into (not a submodule).

    Keeping the backbone out of the module tree means ``accelerator.save_state`` checkpoints hold only
    the bank (DeiT-B: 4.7 MB instead of 350 MB) and DDP synchronises only bank gradients. The backbone
    carries the bank in *unmerged* mode (``tocom_hub.apply(..., merge=False)``), so student and
    inference share one forward: ``compensate.set_pair`` picks the pair, ``compensate.disabled`` turns
    the bank off for the teacher.

    The roles are the inference convention: teacher at r = m without the bank, student at r = n with the
    bank's m → n update — what ``tocom_hub.apply(model, source_r=m, target_r=n)`` runs. A subclass that
    overrides :meth:`roles` (and names itself in :attr:`direction`, recorded in the bank's recipe) trains
    another objective through ``distill.main(argv, distiller_cls=...)``, e.g. the study's Eq. 8 ablation.
    """

    direction = "inference"  # recorded in the recipe and the held-out metrics (a resume must match it)

    def __init__(self, backbone: nn.Module, bank: ToComBank, kd: str = "logits") -> None:
        super().__init__()
        self.bank = bank
        self.__dict__["backbone"] = backbone  # deliberately not registered (see the class docstring)
        self.kd = kd

    def roles(self, m: int, n: int) -> Tuple[int, int]:
        """``(teacher r, student r)`` of the pair ``(m, n)`` (the bank always holds ``m → n``)."""
        return m, n

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        if self.kd == "features":
            return bb.forward_head(bb.forward_features(x), pre_logits=True)
        if self.kd == "tokens":  # every final token (dense mode: one per patch, what a dense head reads)
            return bb.forward_features(x)
        return bb(x)

    @torch.no_grad()
    def teacher(self, x: torch.Tensor, m: int, n: int) -> torch.Tensor:
        bb = self.backbone
        bb.eval()
        tocom_hub.set_r(bb, self.roles(m, n)[0])
        with compensate.disabled(bb):
            return self._run(x)

    def student(self, x: torch.Tensor, m: int, n: int, bank: bool = True) -> torch.Tensor:
        bb = self.backbone
        bb.train(self.training)
        compensate.set_pair(bb, m, n, r=self.roles(m, n)[1])
        if bank:
            return self._run(x)
        with compensate.disabled(bb):
            return self._run(x)

    def forward(self, x: torch.Tensor, m: int, n: int, teacher: bool = True):
        t = self.teacher(x, m, n) if teacher else None
        return self.student(x, m, n), t


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, kd: str, temperature: float = 1.0, reduction: str = "mean"
) -> torch.Tensor:
    """KL(teacher ‖ student) at temperature ``T`` (× T²), or mean L1 for ``kd="features"`` / ``"tokens"``.

    ``reduction="none"`` returns one value per sample (held-out metrics).
    """
    s, t = student.float(), teacher.float()
    if kd in ("features", "tokens"):
        per = (s - t).abs().flatten(1).mean(1)
    else:
        T = temperature
        log_s, log_t = F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1)
        per = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1) * (T * T)
    return per if reduction == "none" else per.mean()


@torch.no_grad()
def heldout_eval(accelerator, distiller: Distiller, loader, pairs: List[Tuple[int, int]], kd: str) -> Dict[str, Any]:
    """Mean KL(teacher ‖ student) (or L1) per pair on the held-out loader, without and with the bank.

    Runs in fp32 (outside autocast) whatever ``--mixed-precision`` says: the KLs compared are ~1e-3
    and bf16 rounding of the logits alone moves them by several per cent.
    """
    was_training = distiller.training
    distiller.eval()
    k = len(pairs)
    sums = torch.zeros(2, k, dtype=torch.float64)
    count = 0
    from tqdm.auto import tqdm

    for x, _ in tqdm(
        loader,
        desc=f"held-out eval ({k} pairs)",
        unit="batch",
        leave=False,
        disable=not accelerator.is_local_main_process,
    ):
        x = x.to(accelerator.device)
        vals = torch.empty(x.shape[0], 2, k, device=x.device)
        for j, (m, n) in enumerate(pairs):  # fp32 even under --mixed-precision: the KL is ~1e-3, bf16 noise is not
            t = distiller.teacher(x, m, n)
            vals[:, 0, j] = kd_loss(distiller.student(x, m, n, bank=False), t, kd, reduction="none")
            vals[:, 1, j] = kd_loss(distiller.student(x, m, n, bank=True), t, kd, reduction="none")
        vals = accelerator.gather_for_metrics(vals)
        sums += vals.double().sum(0).cpu()
        count += vals.shape[0]
    distiller.train(was_training)
    per_pair = (sums / max(count, 1)).tolist()
    name = "kl" if kd == "logits" else "l1"
    return {
        "heldout_metric": (
            {
                "features": "mean |student - teacher| of the pooled features",
                "tokens": "mean |student - teacher| of every final token",
            }[kd]  # fmt: skip
            if kd != "logits"
            else "KL(teacher || student) of the softmax outputs, T = 1"
        ),
        "heldout_direction": distiller.direction,
        f"heldout_{name}_no_bank": statistics.fmean(per_pair[0]),
        f"heldout_{name}_with_bank": statistics.fmean(per_pair[1]),
        "heldout_pairs": [list(p) for p in pairs],
        f"heldout_{name}_no_bank_per_pair": per_pair[0],
        f"heldout_{name}_with_bank_per_pair": per_pair[1],
        "heldout_images": count,
    }

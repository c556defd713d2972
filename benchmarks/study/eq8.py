"""Ablation: train a bank on Eq. 8 of the ToCom paper *as printed*, with the product trainer.

``training/distill.py`` trains the inference convention: teacher = the frozen model at r = m without the
bank, student = the model at r = n with the bank's m → n update, which is what
``tocom_hub.apply(model, source_r=m, target_r=n)`` runs. Eq. 8 as printed swaps the roles (student at
r = m with the m → n update, teacher at r = n); under the inference convention that learns the *negated*
bank: it moves an r = m model towards the r = n model instead of compensating it. This script runs
``distill.py`` unchanged (same flags, data, checkpoints, ``--resume``, outputs) with that one change,
:class:`PaperEq8Distiller`; the bank's recipe and ``metrics.json`` record ``"direction": "paper-eq8"``,
and the held-out KL is measured in the same (swapped) roles. Compare both banks with
``tocom-hub eval --model demo --data photo-crops --source-r 0 --target-r 0,5,10 --bank DIR``::

    python training/distill.py --max-steps 300 --output-dir out/bank-inference
    python benchmarks/study/eq8.py --max-steps 300 --output-dir out/bank-eq8

(docs/training.md has the numbers this comparison gave.)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from tocom_hub.training import distill, run  # noqa: E402
from tocom_hub.training.distiller import Distiller  # noqa: E402

__all__ = ["PaperEq8Distiller", "main"]


class PaperEq8Distiller(Distiller):
    """:class:`~tocom_hub.training.distiller.Distiller` with Eq. 8's roles: teacher at r = n, student at r = m
    with the bank's m → n update."""

    direction = "paper-eq8"

    def roles(self, m: int, n: int) -> Tuple[int, int]:
        return n, m


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``distill.py`` with ``argv`` (its flags, ``--help`` included), training :class:`PaperEq8Distiller`."""
    return distill.main(argv, distiller_cls=PaperEq8Distiller)


if __name__ == "__main__":
    run.script_main(main, "eq8")

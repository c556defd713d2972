"""The pieces the training scripts share, under the one name they had before they were split by concept.

Each lives in its own module; import from there in new code:

* :mod:`.seeds` — per-step seeds, scoped RNG states, the ``(m, n)`` pair draws;
* :mod:`.data` — datasets, timm transforms, the deterministic sampler and training loader;
* :mod:`.batches` — uint8 loader batches normalised on the device;
* :mod:`.args` — the shared command-line flags and their validation;
* :mod:`.backbone` — the embedded default backbone and ``--model`` / ``--checkpoint`` (via the
  package's model loader, :func:`tocom_hub.tools.models.load_model`);
* :mod:`.checkpoints` — atomic checkpoints and a resume that unpickles no code;
* :mod:`.metrics` — top-1 on a loader.

Imports are absolute (``tocom_hub.training.<module>``) so that ``python training/distill.py`` works as
well as ``python -m tocom_hub.training.distill`` and ``accelerate launch``.
"""

from __future__ import annotations

from tocom_hub.training.args import *  # noqa: F403 (re-exported)
from tocom_hub.training.backbone import *  # noqa: F403 (re-exported)
from tocom_hub.training.batches import *  # noqa: F403 (re-exported)
from tocom_hub.training.checkpoints import *  # noqa: F403 (re-exported)
from tocom_hub.training.data import *  # noqa: F403 (re-exported)
from tocom_hub.training.metrics import *  # noqa: F403 (re-exported)
from tocom_hub.training.seeds import *  # noqa: F403 (re-exported)

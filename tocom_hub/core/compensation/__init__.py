"""The bank on a model: what :func:`tocom_hub.apply` attaches and how it reaches the forward.

- :mod:`.api` — ``apply`` / ``set_target_r`` / ``set_pair`` / ``remove`` / ``disabled``: validation first, then
  the change under the model's switch lock;
- :mod:`.compatible` — which bank can serve which model (pure checks);
- :mod:`.base` — the :class:`~.base.Compensation` both modes subclass (bank, pair, scale, layout);
- :mod:`.merged` — the update written into the q/v weight rows (inference; follows the weights);
- :mod:`.hooked` — the update added in the adapted Linears' forward (training; compiles);
- :mod:`.locks` — the per-model switch lock; :mod:`.marker` — the ``tocom_compensation`` state_dict entry.
"""

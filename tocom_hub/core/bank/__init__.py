"""The ToCom bank itself, local files only (every Hub request lives in :mod:`tocom_hub.hub`).

- :mod:`.module` — :class:`~.module.ToComBank`: the stacked LoRA groups, ``delta(m → n)``, save / load;
- :mod:`.config` — :class:`~.config.ToComConfig` and ``tocom_config.json``;
- :mod:`.file` — ``tocom.safetensors``: names, checksum, checked reading, byte-reproducible writing;
- :mod:`.card` — the model card (``README.md``) rendered from ``tocom_hub/MODEL_CARD.md``;
- :mod:`.registry` — which bank for which model (``bank=None``): ``register_bank``, ``registry.json``.
"""

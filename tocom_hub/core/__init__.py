"""The core: token maths (``merge``, ``prune``), the timm surgery (``patch``), the ToCom bank (``bank``) and
its application to a model (``compensate``). Imports nothing from ``tocom_hub.hub``, ``tools``, ``demo`` or
``training``. The public names are re-exported by ``tocom_hub`` itself."""

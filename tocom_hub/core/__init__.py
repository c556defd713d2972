"""The core: token maths (``merge``, ``prune``), the timm surgery (``patch``), the ToCom bank (``bank``, a
``huggingface_hub.ModelHubMixin`` that calls the library itself; its files ``bank_config``, ``bank_file``; what a
Hub repo's errors mean, without network code of ours, ``bank_repo``; the model card ``bank_card``; ``registry``:
which bank for which model) and its application to a model (``compensate``). Imports nothing from
``tocom_hub.hub``, ``tools``, ``demo`` or ``training``. The public names are re-exported by ``tocom_hub`` itself."""

"""The core: token maths (``merge``, ``prune``), the timm surgery (``patch``), the ToCom bank (``bank``; its files
``bank_config``, ``bank_file``; its Hub side through huggingface_hub ``bank_download``, ``bank_push``, ``bank_card``;
``registry``: which bank for which model) and its application to a model (``compensate``). Imports nothing from
``tocom_hub.hub``, ``tools``, ``demo`` or ``training``. The public names are re-exported by ``tocom_hub`` itself."""

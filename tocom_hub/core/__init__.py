"""The core: token maths (``merge``, ``prune``), the timm surgery (``patch``), the ToCom bank (``bank``; its files
``bank_config``, ``bank_file``; the model card ``bank_card``; ``registry``: which bank for which model) and its
application to a model (``compensation/``; ``preserve``). Local files only: no module here makes a network request
or imports one that does (``tests/test_hub_imports.py``); Hub repo ids are ``tocom_hub.hub``'s. Imports nothing from
``tocom_hub.hub``, ``tools``, ``demo`` or ``training``. The public names are re-exported by ``tocom_hub`` itself."""

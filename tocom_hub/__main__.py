"""``python -m tocom_hub`` runs the ``tocom-hub`` command line (see :mod:`tocom_hub.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m prunekit ...`` runs the command line, as ``prunekit ...`` does."""

import sys

from .cli import main

sys.exit(main())

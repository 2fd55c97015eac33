"""``python -m numbaconv bench``: the same as the ``numbaconv`` console script."""

import sys

from .bench.cli import main

sys.exit(main())

"""``python -m micdrv.sim``: see :mod:`micdrv.sim.cli` (``micdrv sim`` imports :func:`main` from here)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m micdrv.sim``: see :mod:`micdrv.sim.cli`."""

import sys

from .cli import main

sys.exit(main())

"""``python -m tsm_lightning.cli``: the console script."""

import sys

from tsm_lightning.cli import main

sys.exit(main())

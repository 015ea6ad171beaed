"""``python -m fastworker.chaos``: see ``fastworker.chaos._cli``."""

import sys

from ._cli import main

sys.exit(main())

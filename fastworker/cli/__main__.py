"""``python -m fastworker.cli``: the ``fastworker`` command."""

import sys

from . import main

sys.exit(main())

"""``python -m bench.handoff``: see the package docstring."""

import sys

from bench.handoff.cli import main

sys.exit(main())

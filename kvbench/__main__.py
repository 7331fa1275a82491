"""`python -m kvbench list` (see kvbench/cli.py)."""

import sys

from kvbench.cli import main

sys.exit(main())

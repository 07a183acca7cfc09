"""``python -m raresignal.demo``: the demo's command line."""

import sys

from raresignal.demo.cli import main

sys.exit(main())

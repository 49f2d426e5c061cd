"""``python -m stride_viz``: the command-line interface (see stride_viz/cli.py)."""
import sys

from .cli import main

sys.exit(main())

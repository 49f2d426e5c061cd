"""``python -m stride_viz``: the command-line interface (see stride_viz/cli.py)."""
import sys

from stride_viz.cli import main

sys.exit(main())

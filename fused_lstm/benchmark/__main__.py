"""``python -m fused_lstm.benchmark``: see :mod:`fused_lstm.benchmark.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

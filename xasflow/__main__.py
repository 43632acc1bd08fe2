"""``python -m xasflow``: the console script without the installed entry point (the same CLI)."""

from __future__ import annotations

import sys

from xasflow.cli import main

if __name__ == "__main__":
    sys.exit(main())

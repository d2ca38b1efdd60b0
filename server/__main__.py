"""``python -m edgetune.server``: the same as ``edgetune server``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

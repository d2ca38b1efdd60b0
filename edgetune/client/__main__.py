"""`python -m edgetune.client`: run one client (what `edgetune client` runs)."""

import sys

from edgetune.client.cli import main

sys.exit(main())

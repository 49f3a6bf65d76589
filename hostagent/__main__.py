"""``python -m hostagent``: the same as the `hostagent` console script."""

from __future__ import annotations

import sys

from hostagent.cli import main

sys.exit(main())

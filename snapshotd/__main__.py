"""``python -m snapshotd``: run the daemon (or ``python -m snapshotd demo``)."""

import sys

from .cli import main

sys.exit(main())

"""The ``snapshotd`` command: run the daemon, or ``snapshotd demo`` for the local cluster demo."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["demo"]:
        from .tools.demo import main as demo_main

        return demo_main(args[1:])
    from .daemon import main as daemon_main

    return daemon_main(args)

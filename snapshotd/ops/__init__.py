"""Operations: the HTTP endpoints (``/metrics``, ``/healthz``, ``/readyz``), ``snapshotctl``,
export to a checkpoint and the persistence tier.

May import ``common``, ``node`` and ``cluster``; nothing from ``tools`` or the daemon.
"""

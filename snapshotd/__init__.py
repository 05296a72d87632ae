"""snapshotd: a per-node daemon holding in-memory snapshots of training state.

Trainers hand it their state through shared memory with the ``snapshotd_client`` library; the
daemon owns the bytes, so a trainer crash loses nothing, and it serves restores.

Run one per node::

    snapshotd --node-slot 0 --memory-limit 8GiB --control ipc:///run/snapshotd/control.sock

See ``docs/protocol.md`` for the control protocol and ``README.md`` for the quick start.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]

"""snapshotd_client: hand asynchronous in-memory snapshots of training state to snapshotd.

A few lines in a training script::

    from snapshotd_client import SnapshotClient

    client = SnapshotClient(job="gpt")                 # rank from $RANK, daemon from env
    client.protect(optimizer)                          # optimizer.step() waits for copies
    if (restored := client.restore(zero_copy=False)) is not None:  # all ranks agree on a step
        start, state = restored
        model.load_state_dict(state["model"]); optimizer.load_state_dict(state["optim"])
    for step in range(start + 1, steps):
        train_one_step()
        client.save(step, {"model": model.state_dict(), "optim": optimizer.state_dict()})

The daemon owns the memory, so a trainer that crashes loses nothing it had committed.
``restore()`` returns copy-on-write views of the daemon's memory by default (no copy; the
version stays leased while they live): the optimizer above would keep them for the whole run
on the CPU, hence ``zero_copy=False`` (``TrainingState`` chooses for you).
"""

from ._adapters import register_type
from ._channel import DaemonError, DaemonUnavailable, SnapshotError
from ._client import (
    ENV_COPY_CPUS,
    ENV_ENDPOINT,
    ENV_TOKEN,
    SnapshotClient,
    SnapshotSkipped,
    SnapshotTorn,
    newest_common_step,
)
from ._training import TrainingState, capture_rng, restore_rng

__all__ = ["SnapshotClient", "SnapshotError", "DaemonUnavailable", "DaemonError",
           "SnapshotSkipped", "SnapshotTorn", "ENV_ENDPOINT", "ENV_TOKEN", "ENV_COPY_CPUS",
           "TrainingState", "newest_common_step", "capture_rng", "restore_rng",
           "register_type"]
__version__ = "0.1.0"

"""``snapshotctl export``: write a version as a ``torch.distributed.checkpoint`` directory.

Needs torch and ``snapshotd_client`` (installed on training nodes); the daemon itself does not.
One rank is written as its own state dict; several ranks are written under ``rank<N>`` keys.
Sharded state (DTensors of FSDP2, tensor parallel, HSDP) is written as each rank's local shards,
plain tensors; a global checkpoint resharded from them is issue 14. Replicated state that the
ranks split among themselves (``split_replicas``) is written whole for every rank, each tensor
taken from the rank that stored it, which must be exported too.
Load it without snapshotd::

    import torch.distributed.checkpoint as dcp
    state = {"rank0": template_state_of_rank_0, ...}      # or the plain state for one rank
    dcp.load(state, checkpoint_id=DIR)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from ..common import protocol as p
from ..common.channel import Channel

__all__ = ["export"]


def _tensor_bytes(obj: Any) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _progress(done: int, total: int, nbytes: int, enabled: bool) -> None:
    if not enabled:
        return
    width = 30
    filled = width * done // max(1, total)
    end = "\n" if done == total else ""
    print(f"\rexport [{'#' * filled}{'.' * (width - filled)}] {done}/{total} ranks, "
          f"{nbytes / (1 << 20):.1f} MiB", end=end, file=sys.stderr, flush=True)


def export(control: str, job: str, step: int | None, out: str,
           ranks: Sequence[int] | None = None, progress: bool = True,
           token: str = "") -> dict[str, Any]:
    """Export (job, step) (newest common step when None) of the given ranks to ``out``."""
    try:
        import torch.distributed.checkpoint as dcp

        from snapshotd_client import SnapshotClient
    except ImportError as exc:
        raise SystemExit(f"snapshotctl export needs torch and snapshotd-client ({exc}); run it "
                         "on a training node or `pip install snapshotd-client`") from None
    ch = Channel(control)
    try:
        versions = ch.call(p.ListVersions(job, token=token)).versions
    finally:
        ch.close()
    held: dict[int, set[int]] = {}
    for v in versions:
        held.setdefault(v.rank, set()).add(v.step)
    chosen = sorted(held) if ranks is None else list(ranks)
    if not chosen or any(r not in held for r in chosen):
        raise SystemExit(f"job {job!r}: ranks held here are {sorted(held)}, asked {chosen}")
    common = set.intersection(*(held[r] for r in chosen))
    if step is None:
        step = max(common) if common else None
    if step is None or step not in common:
        raise SystemExit(f"job {job!r}: step {step} is not held by every rank {chosen}; steps "
                         f"held by all: {sorted(common)}")
    states, nbytes = {}, 0
    _progress(0, len(chosen), 0, progress)
    for i, rank in enumerate(chosen):
        with SnapshotClient(control, job=job, rank=rank, token=token) as client:
            # A read, not a restore: the rank's newer versions stay (a restore of an older
            # step would start a new timeline and drop them).
            got = client.read(step, local_shards=True)
            if got is None:
                raise SystemExit(f"job {job!r} rank {rank}: step {step} is gone; export again")
            _, states[rank] = got
            nbytes += _tensor_bytes(states[rank])
        _progress(i + 1, len(chosen), nbytes, progress)
    # Replicated state split across replicas (TrainingState's split_replicas): each rank's
    # snapshot holds a marker where another rank stored the tensor; the export writes every
    # rank whole, the tensor taken from the rank that stored it.
    from snapshotd_client._replicas import fill_from_owners

    missing = fill_from_owners(states)
    if missing:
        raise SystemExit(f"job {job!r} step {step}: {len(missing)} replicated tensors of the "
                         f"ranks asked are stored by ranks not exported (ranks held here: "
                         f"{sorted(held)}): {'; '.join(missing[:4])}; export those ranks too "
                         "(from the node that holds them: exports across nodes are issue 14)")
    state = states[chosen[0]] if len(chosen) == 1 else {f"rank{r}": s for r, s in states.items()}
    dcp.save(state, checkpoint_id=out, no_dist=True)
    return {"job": job, "step": step, "ranks": chosen, "out": out, "bytes": nbytes}

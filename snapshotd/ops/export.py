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
            client.run = None                   # an operator's export: whatever run wrote it
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


def export_global(control: str, job: str, step: int | None, out: str, progress: bool = True,
                  token: str = "") -> dict[str, Any]:
    """Write one global DCP checkpoint of (job, step): every rank of the job, read from this
    node's daemon or, through it, from the node of the cluster that holds it; each sharded
    tensor assembled whole from its ranks' shards (placed by their recorded offsets), each
    replicated one written once. Plain ``dcp.load`` reads it at any world size: the model
    under ``model.<name>``, the optimizer state under ``optimizer.state.<name>.<key>`` (for
    ``TrainingState(state_dicts="dcp")`` snapshots), and the job-wide rest (step, scheduler,
    data position, extra objects) from rank 0. ``step`` None: the newest step one saved layout
    holds whole."""
    try:
        import torch
        import torch.distributed.checkpoint as dcp

        from snapshotd_client import SnapshotClient
        from snapshotd_client._elastic import Survey, _chunks_of, _read_old
    except ImportError as exc:
        raise SystemExit(f"snapshotctl export needs torch and snapshotd-client ({exc}); run it "
                         "on a training node or `pip install snapshotd-client`") from None
    ch = Channel(control)
    try:
        status = ch.call(p.Status(token=token))
        versions = ch.call(p.ListVersions(job, token=token)).versions
        nodes = ch.call(p.Where(job, token=token)).nodes
    finally:
        ch.close()
    found = Survey([status.node_slot], [{(v.rank, v.step): v.world for v in versions}],
                   {n.slot: {(r, s): n.world for r in n.ranks for s in n.steps} for n in nodes
                    if n.slot != status.node_slot})
    if step is None:
        chosen = found.choose()
        if chosen is None:
            raise SystemExit(f"job {job!r}: no step is held whole by the cluster's daemons")
        step, world = chosen
    else:
        worlds = sorted({w for h in found._all() for (_, s), w in h.items() if s == step},
                        reverse=True)
        world = next((w for w in worlds if w and set(found.holders(step, w)) >= set(range(w))),
                     0)
        if not world:
            raise SystemExit(f"job {job!r}: step {step} is not held whole by the cluster's "
                             f"daemons (ranks held: {sorted(found.holders(step, 0))})")
    holders = found.holders(step, world)
    full: dict[str, Any] = {}
    filled: dict[str, int] = {}
    seen: set[tuple[str, tuple[int, ...]]] = set()
    rest: dict[str, Any] = {}
    nbytes = 0
    _progress(0, world, 0, progress)
    with SnapshotClient(control, job=job, rank=0, token=token) as client:
        client.run = None                       # an operator's export: whatever run wrote it
        for i, rank in enumerate(range(world)):
            old = _read_old(client, rank, step, holders[rank][1])
            chunks, values = _chunks_of(old)
            for fqn, dtype, shape, offsets, sizes, idx in chunks:
                if (fqn, tuple(offsets)) in seen:           # a replica of a chunk written
                    continue
                seen.add((fqn, tuple(offsets)))
                target = full.get(fqn)
                if target is None:
                    target = full[fqn] = torch.empty(shape, dtype=getattr(torch, dtype))
                index = tuple(slice(o, o + n) for o, n in zip(offsets, sizes, strict=True))
                target[index] = old.tensors[idx]
                filled[fqn] = filled.get(fqn, 0) + old.tensors[idx].numel()
                nbytes += old.tensors[idx].numel() * old.tensors[idx].element_size()
            if rank == 0:
                full.update({k: v for k, v in values.items() if k not in full})
                sk = old.skeleton
                rest = {k: v for k, v in sk.items() if k not in ("model", "optimizer", "rng",
                                                                "generators", "replicas")}
            del old
            _progress(i + 1, world, nbytes, progress)
    partial = [f"{fqn} ({filled[fqn]} of {t.numel()} elements)" for fqn, t in full.items()
               if isinstance(t, torch.Tensor) and fqn in filled and filled[fqn] != t.numel()]
    if partial:
        raise SystemExit(f"job {job!r} step {step}: tensors not held whole: "
                         f"{'; '.join(partial[:4])}")
    full.update({k: v for k, v in rest.items() if k not in full})
    dcp.save(full, checkpoint_id=out, no_dist=True)
    return {"job": job, "step": step, "world": world, "ranks": list(range(world)), "out": out,
            "bytes": nbytes, "tensors": sum(isinstance(v, torch.Tensor) for v in full.values())}

"""The GPT of ``train.py`` trained with FSDP2 (``fully_shard``), FSDP2 x tensor parallel, or HSDP,
under torchrun, snapshotted every step with the same lines as the DDP example.

Run it with one snapshotd per node and ``SNAPSHOTD_ENDPOINT`` pointing at it (CPU + gloo)::

    torchrun --nproc-per-node=2 examples/train_fsdp.py --steps 200 --out run1
    torchrun --nproc-per-node=4 examples/train_fsdp.py --parallel fsdp-tp --out run2   # 2x2 mesh
    torchrun --nproc-per-node=4 examples/train_fsdp.py --parallel hsdp --out run3      # 2x2 mesh

Parameters and AdamW moments are ``DTensor`` s: each rank holds a shard. Each rank's snapshot holds
its local shards and where they sit in the global tensors (global shape, placements, mesh,
offsets); a rank restarted by torchrun restores its shards in place from its daemon and the run
goes on bit-identical to an uninterrupted one.

``--parallel``:

- ``fsdp`` (default): ``fully_shard`` every block and the root over a 1-D mesh of all ranks.
- ``fsdp-tp``: a 2-D mesh (``dp`` x ``tp``, ``--tp`` ranks per tensor-parallel group): every
  block's MLP is tensor-parallel (column- then row-wise) over ``tp``, and everything is
  ``fully_shard`` ed over ``dp``. Ranks of one ``tp`` group read the same batches.
- ``hsdp``: a 2-D mesh (``replicate`` x ``shard``, ``--replicas`` replicas): parameters are
  sharded within a replica and replicated across replicas (``fully_shard`` on the 2-D mesh).

``--state-dicts dcp`` captures the model and optimizer through
``torch.distributed.checkpoint.state_dict.get_state_dict`` / ``set_state_dict`` instead of their
own ``state_dict()``. Output as in ``train.py``, except that ``final.pt`` (rank 0) holds the full
parameters and the full AdamW moments and step counts (``param/``, ``exp_avg/``, ``exp_avg_sq/``,
``step/`` + parameter name), gathered from the shards; ``loss.jsonl`` lines say the world size.

``--digests`` (the demo): after every step each rank appends an XXH3 digest of its local shards
of every parameter and AdamW state to ``digests.jsonl`` (a few ms: no collective), so two runs
at the same world size compare bit for bit at every step. After a restore at another world
size (``client.last_restore.world_from``), the ranks gather the restored full tensors once and
rank 0 logs, as an ``elastic_check`` event, the digests the *saved* layout's ranks would have
of them (each full tensor cut as ``fully_shard`` cuts it for that many ranks): equal to the
digests the saved job logged at that step exactly when every restored global tensor equals the
saved one.
"""

import argparse
import os
import random
import signal
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import xxhash
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)
from train import _T_IMPORTED, GPT, SIZES, SyntheticCorpus, log_line, lr_factor, process_started

from snapshotd_client import SnapshotClient, TrainingState


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parallel", choices=["fsdp", "fsdp-tp", "hsdp"], default="fsdp")
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel degree (fsdp-tp)")
    ap.add_argument("--replicas", type=int, default=2, help="replica groups (hsdp)")
    ap.add_argument("--state-dicts", choices=["module", "dcp"], default="module",
                    help="TrainingState(state_dicts=...): the modules' own state dicts, or "
                         "torch.distributed.checkpoint.state_dict's helpers")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps in all")
    ap.add_argument("--job", default="train-fsdp-example", help="job name in snapshotd")
    ap.add_argument("--out", default="train-fsdp-out", help="directory for logs and final.pt")
    ap.add_argument("--snapshot", action=argparse.BooleanOptionalAction, default=True,
                    help="snapshot every step through snapshotd ($SNAPSHOTD_ENDPOINT)")
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--fail-at", action="append", default=[], metavar="RANK:STEP",
                    help="test fault injection: SIGKILL this rank during this step "
                         "(first attempt only); repeatable")
    ap.add_argument("--step-delay", type=float, default=0.0,
                    help="sleep this long after each step (slows a tiny run for tests)")
    ap.add_argument("--digests", action="store_true",
                    help="log a digest of every rank's shards after every step, and an "
                         "elastic_check after a restore at another world size (see above)")
    return ap.parse_args(argv)


def build(args: argparse.Namespace, world: int) -> tuple[GPT, DeviceMesh, int, int]:
    """The model, sharded as ``--parallel`` says; its mesh; this rank's data rank and count."""
    size = SIZES[args.size]
    torch.manual_seed(args.seed)                         # same full model on every rank
    model = GPT(size["vocab"], size["d"], size["layers"], size["heads"], size["seq"],
                args.dropout)
    if args.parallel == "fsdp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
        shard_mesh, data_rank, data_world = mesh, mesh.get_local_rank(), world
    elif args.parallel == "fsdp-tp":
        if world % args.tp:
            raise SystemExit(f"--parallel fsdp-tp: {world} ranks do not split into --tp "
                             f"{args.tp}")
        mesh = init_device_mesh("cpu", (world // args.tp, args.tp), mesh_dim_names=("dp", "tp"))
        for block in model.blocks:                       # Megatron-style MLP over tp
            parallelize_module(block, mesh["tp"], {"mlp.0": ColwiseParallel(),
                                                  "mlp.2": RowwiseParallel()})
        shard_mesh = mesh["dp"]
        data_rank, data_world = mesh.get_local_rank("dp"), world // args.tp
    else:
        if world % args.replicas:
            raise SystemExit(f"--parallel hsdp: {world} ranks do not split into --replicas "
                             f"{args.replicas}")
        mesh = init_device_mesh("cpu", (args.replicas, world // args.replicas),
                                mesh_dim_names=("replicate", "shard"))
        shard_mesh, data_rank, data_world = mesh, dist.get_rank(), world
    for block in model.blocks:
        fully_shard(block, mesh=shard_mesh)
    fully_shard(model, mesh=shard_mesh)
    return model, mesh, data_rank, data_world


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Full parameters and AdamW state, gathered from the shards (a collective: every rank)."""
    def full(t: Any) -> torch.Tensor:
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()

    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        out[f"param/{name}"] = full(param)
        for key, value in optimizer.state.get(param, {}).items():
            out[f"{key}/{name}"] = full(value)
    return out


def _states(model: torch.nn.Module, optimizer: torch.optim.Optimizer
            ) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter and its AdamW state, in a fixed order."""
    out = []
    for name, param in model.named_parameters():
        out.append((f"param/{name}", param))
        out += [(f"{key}/{name}", value)
                for key, value in sorted(optimizer.state.get(param, {}).items())]
    return out


def _digest(pieces: list[tuple[str, torch.Tensor]]) -> str:
    h = xxhash.xxh3_128()
    for name, t in pieces:
        t = t.detach().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def shard_digest(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """A digest of this rank's local shards (no collective)."""
    return _digest([(n, t.to_local() if isinstance(t, DTensor) else t)
                    for n, t in _states(model, optimizer)])


def layout_digests(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   world: int) -> list[str]:
    """The :func:`shard_digest` each rank of a ``world``-rank ``--parallel fsdp`` job would
    have of this job's state (a collective: the full tensors are gathered). ``fully_shard``
    cuts a tensor into ``torch.chunk(full, world)`` along dim 0 (ranks past the last chunk
    hold an empty shard)."""
    states = _states(model, optimizer)
    full = {n: t.full_tensor() if isinstance(t, DTensor) else t for n, t in states}
    out = []
    for rank in range(world):
        pieces = []
        for name, t in states:
            if isinstance(t, DTensor):
                if tuple(t.placements) != (Shard(0),):
                    raise SystemExit(f"--digests: {name} is placed {t.placements}, not "
                                     "Shard(0) (only --parallel fsdp is checked)")
                chunks = torch.chunk(full[name], world, dim=0)
                piece = chunks[rank] if rank < len(chunks) else full[name][:0]
            else:
                piece = t
            pieces.append((name, piece))
        out.append(_digest(pieces))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    t_group = time.time()
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    fail_at = {int(r): int(s) for r, s in (f.split(":") for f in args.fail_at)}
    os.makedirs(args.out, exist_ok=True)
    size = SIZES[args.size]

    model, mesh, data_rank, data_world = build(args, world)
    # Per data rank: ranks that compute the same activations (a tp group) draw the same masks.
    torch.manual_seed(args.seed * 1000 + 1 + data_rank)
    np.random.seed(args.seed * 1000 + 1 + data_rank)
    random.seed(args.seed * 1000 + 1 + data_rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.steps))
    data = SyntheticCorpus(size["vocab"], size["seq"], size["batch"], data_rank, data_world,
                           seed=1234 + args.seed)

    # --- snapshotd: the same lines as for DDP ---------------------------------------------
    started = time.time()
    last, state = None, None
    if args.snapshot:
        client = SnapshotClient(job=args.job)              # $SNAPSHOTD_ENDPOINT, rank $RANK
        state = TrainingState(model, optimizer, scheduler, data=data,
                              state_dicts=args.state_dicts)
        client.protect(optimizer)                          # step() waits for copies in flight
        last = state.restore(client)                       # same step on every rank, or None
    # ---------------------------------------------------------------------------------------
    restore_s = time.time() - started
    first = 0 if last is None else last + 1
    log_line(os.path.join(args.out, "events.jsonl"), {
        "event": "start", "rank": rank, "world": world, "attempt": attempt, "pid": os.getpid(),
        "parallel": args.parallel, "mesh": list(mesh.shape), "restored": last,
        "daemon": client.endpoint if args.snapshot else None,
        "first_step": first, "restore_s": round(restore_s, 4), "time": time.time(),
        # the same start times as train.py's (the demo's time-to-resume breakdown)
        "group_rank": int(os.environ.get("GROUP_RANK", "0")), "t_process": process_started(),
        "t_imported": _T_IMPORTED, "t_group": t_group, "t_built": started,
        "restore_parts": state.last_restore_seconds if state else {},
        "world_from": getattr(client.last_restore, "world_from", None) if last is not None
        else None,
        "bytes_from_peers": getattr(client.last_restore, "bytes_from_peers", 0)
        if last is not None else 0})
    if args.digests and last is not None and client.last_restore.world_from:
        saved_world = client.last_restore.world_from
        digests = layout_digests(model, optimizer, saved_world)
        if rank == 0:
            log_line(os.path.join(args.out, "events.jsonl"), {
                "event": "elastic_check", "step": last, "world": world,
                "world_from": saved_world, "digests": digests, "time": time.time()})

    for step in range(first, args.steps):
        x, y = data.next_batch()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if fail_at.get(rank) == step and attempt == 0:
            os.kill(os.getpid(), signal.SIGKILL)         # test fault injection
        optimizer.step()
        scheduler.step()
        if args.snapshot:
            state.save(client, step)                       # --- snapshotd: async save
        if args.digests:
            log_line(os.path.join(args.out, "digests.jsonl"), {
                "step": step, "rank": rank, "world": world, "attempt": attempt,
                "digest": shard_digest(model, optimizer)})
        if rank == 0:
            log_line(os.path.join(args.out, "loss.jsonl"), {
                "step": step, "loss": loss.item(), "time": time.time(), "attempt": attempt,
                "resumed_from": last, "pid": os.getpid(), "world": world})
        if args.step_delay:
            time.sleep(args.step_delay)

    if args.snapshot:
        client.close()                                     # --- snapshotd: flush and close
        stats = client.stats()
        log_line(os.path.join(args.out, "events.jsonl"), {
            "event": "stats", "rank": rank, "attempt": attempt, **stats.__dict__})
    final = full_state(model, optimizer)
    if rank == 0:
        torch.save(final, os.path.join(args.out, "final.pt"))
        log_line(os.path.join(args.out, "events.jsonl"),
                 {"event": "done", "rank": rank, "steps": args.steps, "time": time.time()})
    dist.barrier()                                       # every rank leaves together
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

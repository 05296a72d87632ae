"""One rank of a 4-rank job on 2x2 meshes (FSDP2 x TP, then HSDP), for test_sharded_state.py.

    RANK=r WORLD_SIZE=4 MASTER_ADDR=127.0.0.1 MASTER_PORT=p \\
        python sharded_worker.py --endpoint ipc://... --job J --out DIR

For each layout the rank trains a small model whose shards are uneven (FSDP over 15 and 3 rows)
and, with tensor parallelism, strided (``_StridedShard``), saving every step through a real
daemon, and checks:

1. every snapshot equals the state at its save() although it was copied in the background
   while the next forward and backward ran, and nothing guarded was copied at save()
   (``eager_bytes == 0``: DTensor parameters and moments are recognised by their local shards);
2. every DTensor's recorded offsets place its shard in the global tensor (the shards of all
   ranks reassemble ``full_tensor()``), and equal DCP's chunk metadata;
3. ``TrainingState.restore`` into a fresh model and optimizer (other initial values, no
   optimizer state) gives back every local shard bit for bit, with the same placements, and
   the next step computes the same bits as the original;
4. a model sharded another way (FSDP over all 4 ranks) is refused naming the tensor and
   resharding (issue 14), and is left unchanged.

Writes ``rank<r>.json`` (what was checked) to ``--out``; exits non-zero on a failed check.

With ``--endpoints A,B`` (ranks 0-1 on daemon A, 2-3 on B, daemons that code across nodes)
replicated DTensors are split over their replica dimension: a raw restore of a step is
reassembled (one broadcast per owner) before it is compared, and the refusal of another layout
names the tensors this rank holds.
"""

import argparse
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from snapshotd_client import SnapshotClient, SnapshotError, TrainingState
from snapshotd_client._flatten import flatten
from snapshotd_client._replicas import reassemble_dtensors

#: Width of the hidden layer (``--hidden``): 32 keeps every tensor small; the replica-split
#: test widens it so that most bytes are in tensors large enough to split.
HIDDEN = 32


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.up = nn.Linear(8, 15), nn.Linear(15, HIDDEN)
        self.down, self.out = nn.Linear(HIDDEN, 15), nn.Linear(15, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(h + self.down(torch.relu(self.up(h))))


def build(layout: str, seed: int) -> tuple[Net, torch.optim.Optimizer, int]:
    """The model sharded as ``layout`` says, its AdamW, and this rank's data-parallel rank."""
    torch.manual_seed(seed)
    model = Net()
    if layout in ("fsdp-tp", "fsdp-tp-swapped"):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        up, down = ColwiseParallel(), RowwiseParallel()
        if layout == "fsdp-tp-swapped":                    # same meshes, other placements
            up, down = RowwiseParallel(), ColwiseParallel()
        parallelize_module(model, mesh["tp"], {"up": up, "down": down})
        fully_shard(model, mesh=mesh["dp"])
        data_rank = mesh.get_local_rank("dp")
    elif layout == "hsdp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        fully_shard(model, mesh=mesh)
        data_rank = dist.get_rank()
    else:                                                    # "fsdp-4": another layout
        fully_shard(model, mesh=init_device_mesh("cpu", (4,), mesh_dim_names=("dp",)))
        data_rank = dist.get_rank()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2), data_rank


def forward_backward(model: Net, data_rank: int, step: int) -> None:
    g = torch.Generator().manual_seed(1000 * data_rank + step)
    model(torch.randn(4, 8, generator=g)).pow(2).mean().backward()


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def snapshot_of(model: Net, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """This rank's bytes of the model and the optimizer, by parameter name (clones)."""
    out = {}
    names = {p: n for n, p in model.named_parameters()}
    for name, param in model.named_parameters():
        out[f"param/{name}"] = local(param).detach().clone()
    for param, moments in optimizer.state.items():
        for key, value in moments.items():
            out[f"{key}/{names[param]}"] = local(value).detach().clone()
    return out


def placements(model: Net, optimizer: torch.optim.Optimizer) -> dict[str, str]:
    out = {n: str(p.placements) for n, p in model.named_parameters()}
    names = {p: n for n, p in model.named_parameters()}
    for param, moments in optimizer.state.items():
        out[f"exp_avg/{names[param]}"] = str(moments["exp_avg"].placements)
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), (what, sorted(set(a) ^ set(b)))
    differ = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
              or not torch.equal(a[k].reshape(-1).view(torch.uint8),
                                 b[k].reshape(-1).view(torch.uint8))]
    assert not differ, f"{what}: {differ} differ"


def check_offsets(model: Net) -> int:
    """The recorded offsets of every shard reassemble the global tensor (all ranks' shards)."""
    layout = flatten(model.state_dict())
    mine = {}
    for idx, rec in layout.sharding.items():
        name = layout.entries[idx]["name"]
        (chunk,) = layout.dtensors[idx].__create_chunk_list__()    # DCP's metadata
        assert rec["offsets"] == list(chunk.offsets), (name, rec, chunk)
        mine[name] = (rec, layout.tensors[idx].clone())
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    checked = 0
    for name, param in model.state_dict().items():
        full = param.full_tensor()                          # a collective: every rank
        rec = mine["/" + name][0]
        if any(p.startswith("_S") for p in rec["placements"]):
            continue              # a strided shard is not one block at its first offset
        assembled = torch.full_like(full, float("nan"))
        for theirs in everyone:
            r, shard = theirs["/" + name]
            index = tuple(slice(o, o + s) for o, s in zip(r["offsets"], shard.shape))
            assembled[index] = shard
        assert torch.equal(assembled, full), name
        checked += 1
    return checked


def run_layout(layout: str, state_dicts: str, args: argparse.Namespace) -> dict:
    rank = dist.get_rank()
    job = f"{args.job}-{layout}"
    model, optimizer, data_rank = build(layout, seed=0)
    state = TrainingState(model, optimizer, state_dicts=state_dicts, rng=False)
    client = SnapshotClient(args.endpoint, job=job, rank=rank, timeout=timedelta(seconds=60))
    steps, expected, split = 4, {}, 0
    for step in range(steps):
        forward_backward(model, data_rank, step)       # overlaps the previous save's copy
        if step:
            client.wait()
            got_step, snap = client.restore(step - 1, meshes=state.meshes())
            assert got_step == step - 1
            if "replicas" in snap:                      # split over the replicate dimension
                split += 1
                snap.update(reassemble_dtensors({"model": snap["model"],
                                                 "optimizer": snap["optimizer"]},
                                                state.meshes()))
            restored = {}
            names = {i: n for i, n in enumerate(n for n, _ in model.named_parameters())}
            for name, value in snap["model"].items():
                restored[f"param/{name}"] = local(value)
            for pid, moments in snap["optimizer"]["state"].items():
                name = pid if isinstance(pid, str) else names[pid]
                for key, value in moments.items():
                    assert isinstance(value, DTensor) or key == "step", (key, type(value))
                    restored[f"{key}/{name}"] = local(value)
            same(restored, expected[step - 1], f"{layout}: snapshot of step {step - 1}")
        optimizer.step()
        optimizer.zero_grad()
        state.save(client, step)
        expected[step] = snapshot_of(model, optimizer)
    client.close()
    stats = client.stats()
    assert stats.committed == steps and stats.failed == 0, stats
    assert stats.eager_bytes == 0, f"{layout}: guarded DTensors copied at save(): {stats}"
    local_bytes = sum(t.numel() * t.element_size() for t in snapshot_of(model,
                                                                          optimizer).values())
    reassembled = check_offsets(model)
    strided = sum("_StridedShard" in p for p in placements(model, optimizer).values())

    # A fresh process's model and optimizer: other initial values, no optimizer state.
    # A split snapshot is gathered whatever split_replicas says now (it decides saves only).
    model2, optimizer2, _ = build(layout, seed=1)
    state2 = TrainingState(model2, optimizer2, state_dicts=state_dicts, rng=False,
                           split_replicas=not split)
    with SnapshotClient(args.endpoint, job=job, rank=rank) as client2:
        assert state2.restore(client2) == steps - 1
    same(snapshot_of(model2, optimizer2), expected[steps - 1], f"{layout}: restored state")
    assert placements(model2, optimizer2) == placements(model, optimizer)
    for m, o in ((model, optimizer), (model2, optimizer2)):
        forward_backward(m, data_rank, steps)
        o.step()
    same(snapshot_of(model2, optimizer2), snapshot_of(model, optimizer),
         f"{layout}: the step after the restore")

    if split:
        # One rank cannot restore (its TrainingState wants an object the snapshot lacks):
        # every rank raises, none waits forever in the reassembly's broadcasts, and nothing
        # is written anywhere.
        model4, optimizer4, _ = build(layout, seed=3)
        before4 = snapshot_of(model4, optimizer4)
        extra = {"scaler": torch.nn.Linear(1, 1)} if rank == 1 else None
        state4 = TrainingState(model4, optimizer4, state_dicts=state_dicts, rng=False,
                               extra=extra)
        with SnapshotClient(args.endpoint, job=job, rank=rank) as client4:
            try:
                state4.restore(client4)
            except (SnapshotError, ValueError) as exc:
                why = str(exc)
            else:
                raise AssertionError("a restore that one rank refused went ahead")
        assert ("extra objects missing" in why if rank == 1 else "another rank" in why), why
        same(snapshot_of(model4, optimizer4), before4, f"{layout}: refused restore wrote")

    # Another layout of the same model: refused, nothing written. For FSDP x TP the same
    # meshes with up and down parallelised the other way round (their biases replicated
    # over tp: a restore that might be split must still check every placement).
    model3, optimizer3, _ = build("fsdp-tp-swapped" if layout == "fsdp-tp" else "fsdp-4",
                                  seed=2)
    before = snapshot_of(model3, optimizer3)
    state3 = TrainingState(model3, optimizer3, state_dicts=state_dicts, rng=False)
    with SnapshotClient(args.endpoint, job=job, rank=rank) as client3:
        try:
            state3.restore(client3)
        except SnapshotError as exc:
            refused = str(exc)
        else:
            raise AssertionError(f"{layout}: restore onto another layout was not refused")
    assert "issue 14" in refused, refused
    assert split or "/model/inp.weight" in refused or "/model/up.weight" in refused, refused
    same(snapshot_of(model3, optimizer3), before, f"{layout}: refused restore wrote")
    return {"layout": layout, "state_dicts": state_dicts, "steps": steps,
            "reassembled": reassembled, "strided": strided, "refused": refused,
            "eager_bytes": stats.eager_bytes, "split": split, "local_bytes": local_bytes,
            # saves laid out from the previous one's layout, with DCP's FQN mapping kept
            "layout_hits": client._layouts.hits, "dcp_hits": state._dcp.hits}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", help="the one daemon of every rank")
    ap.add_argument("--endpoints", help="daemons, one per 2 ranks (comma-separated)")
    ap.add_argument("--layouts", default="fsdp-tp:module,hsdp:dcp")
    ap.add_argument("--job", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", type=int, default=32)
    args = ap.parse_args()
    global HIDDEN
    HIDDEN = args.hidden
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    if args.endpoints:
        args.endpoint = args.endpoints.split(",")[dist.get_rank() // 2]
    results = [run_layout(*layout.split(":"), args) for layout in args.layouts.split(",")]
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as fh:
        json.dump(results, fh)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without the interpreter's teardown: a gloo worker was seen to abort there, once in
    # hundreds of runs ("terminate called without an active exception"), after everything was
    # checked and written and the process group destroyed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

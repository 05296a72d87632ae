"""A small GPT-style language model trained with DDP under torchrun, snapshotted every step.

Run it with one snapshotd per node and ``SNAPSHOTD_ENDPOINT`` pointing at it::

    torchrun --nproc-per-node=2 examples/train.py --steps 200 --out run1

The snapshotd part is the block marked ``snapshotd`` below: make a client, protect the
optimizer, restore (every rank gets the same step, or None on a fresh start), save after each
step, close. :class:`snapshotd_client.TrainingState` gathers what an exact resume needs: model,
optimizer, LR scheduler, the RNGs (torch, numpy, Python) and the data position.

Everything else is deterministic so that a run restarted from a snapshot ends with parameters
bit-identical to an uninterrupted run: fixed seeds, a synthetic corpus generated from a seed,
a sampler whose position (epoch, offset) is part of the snapshot, one thread per process,
deterministic kernels, and gradients averaged in a fixed rank order (see
:func:`ordered_allreduce_hook`).

Output (``--out DIR``): rank 0 appends one JSON line per step to ``loss.jsonl``; every rank
appends a ``start`` line to ``events.jsonl`` (attempt, step restored, restore time); at the end
rank 0 writes the final parameters to ``final.pt``. ``--fail-at RANK:STEP`` is fault injection
for tests: that rank SIGKILLs itself during that step, on the first attempt only.
"""

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from snapshotd_client import SnapshotClient, TrainingState

_T_IMPORTED = time.time()       # for the time-to-resume breakdown (see process_started)

SIZES: dict[str, dict[str, int]] = {
    # about 2.4M parameters; ~0.1-0.2 s a step per rank on one CPU core
    "small": dict(vocab=1024, d=192, layers=4, heads=4, seq=64, batch=8),
    # for tests: about 70k parameters, a few ms a step
    "tiny": dict(vocab=128, d=48, layers=2, heads=2, seq=32, batch=4),
}


# ----------------------------------------------------------------------------- data


class SyntheticCorpus:
    """Token sequences from a fixed random "grammar", sharded over ranks, read in epochs.

    Sequence ``i`` is the same in every run (generated from ``seed``); each epoch visits the
    corpus in a seeded permutation, rank ``r`` taking every ``world``-th sample. The position
    (epoch, offset in this rank's shard) is all the state there is, so a run restored with it
    reads exactly the batches an uninterrupted run would.
    """

    def __init__(self, vocab: int, seq: int, batch: int, rank: int, world: int,
                 samples: int = 8192, seed: int = 1234) -> None:
        g = torch.Generator().manual_seed(seed)
        successors = torch.randint(0, vocab, (vocab, 4), generator=g)
        weights = torch.tensor([0.55, 0.25, 0.12, 0.08])
        choice = torch.multinomial(weights, samples * seq, replacement=True, generator=g)
        choice = choice.view(samples, seq)
        tokens = torch.empty(samples, seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab, (samples,), generator=g)
        for t in range(seq):
            tokens[:, t + 1] = successors[tokens[:, t], choice[:, t]]
        self.tokens, self.batch, self.rank, self.world, self.seed = tokens, batch, rank, world, seed
        self.epoch, self.offset = 0, 0
        self._order: tuple[int, torch.Tensor] | None = None

    def _shard(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1009 + self.epoch)
            perm = torch.randperm(len(self.tokens), generator=g)
            self._order = (self.epoch, perm[self.rank::self.world])
        return self._order[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        shard = self._shard()
        if self.offset + self.batch > len(shard):
            self.epoch, self.offset = self.epoch + 1, 0
            shard = self._shard()
        rows = self.tokens[shard[self.offset:self.offset + self.batch]]
        self.offset += self.batch
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


# ----------------------------------------------------------------------------- model


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))            # (b, heads, t, hd)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        att = self.drop(att.masked_fill(causal, float("-inf")).softmax(-1))
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*(Block(d, heads, dropout) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)
        for name, param in self.named_parameters():             # GPT-2 style initialisation
            if name.endswith("weight") and param.dim() == 2:
                nn.init.normal_(param, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok(idx) + self.pos(torch.arange(idx.shape[1])))
        return self.ln(self.blocks(x)) @ self.tok.weight.t()         # tied output head


def ordered_allreduce_hook(group: Any,
                           bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average a gradient bucket by summing all ranks' copies in rank order.

    A plain all-reduce sums each element in an order that depends on where it falls inside the
    bucket, and DDP re-packs its buckets after the first iteration of every process: a
    restarted run would then add the same numbers in another order for one step, and with
    three or more ranks floating-point addition is not associative. Gathering and summing in
    rank order gives the same bits whatever the bucket layout.
    """
    buf = bucket.buffer()
    world = dist.get_world_size(group)
    parts = [torch.empty_like(buf) for _ in range(world)]
    fut = dist.all_gather(parts, buf, group=group, async_op=True).get_future()

    def average(done: torch.futures.Future) -> torch.Tensor:
        done.value()                  # re-raises if the gather failed (e.g. a peer died)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total.div_(world)

    return fut.then(average)


def lr_factor(step: int, total: int, warmup: int = 40) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps in all")
    ap.add_argument("--job", default="train-example", help="job name in snapshotd")
    ap.add_argument("--out", default="train-out", help="directory for logs and final.pt")
    ap.add_argument("--snapshot", action=argparse.BooleanOptionalAction, default=True,
                    help="snapshot every step through snapshotd ($SNAPSHOTD_ENDPOINT)")
    ap.add_argument("--whole-replicas", action="store_true",
                    help="every rank stores the whole replicated state (default: each rank "
                    "stores 1/world of it where the daemons code across nodes)")
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--tiny", dest="size", action="store_const", const="tiny",
                    help="same as --size tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--fail-at", action="append", default=[], metavar="RANK:STEP",
                    help="test fault injection: SIGKILL this rank during this step "
                         "(first attempt only); repeatable")
    ap.add_argument("--deterministic-algorithms", action="store_true",
                    help="torch.use_deterministic_algorithms(True): not needed on CPU, where "
                         "every kernel this model uses is deterministic, and it costs about "
                         "2 s of start-up (it imports the compiler stack) at every restart")
    ap.add_argument("--step-delay", type=float, default=0.0,
                    help="sleep this long after each step (slows a tiny run for tests)")
    return ap.parse_args(argv)


def process_started() -> float | None:
    """Wall time this process started (Linux /proc, to 10 ms), or None elsewhere: with the
    times logged at the ``start`` event it splits a restart into process start and imports,
    process-group set-up, model set-up, restore agreement and restore (the demo's summary)."""
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])     # field 22: starttime
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def log_line(path: str, record: dict[str, Any]) -> None:
    """Append one JSON line (a single write, so concurrent ranks do not interleave)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.deterministic_algorithms:
        torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo")
    t_group = time.time()
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    fail_at = {int(r): int(s) for r, s in (f.split(":") for f in args.fail_at)}
    os.makedirs(args.out, exist_ok=True)
    size = SIZES[args.size]

    torch.manual_seed(args.seed)                         # same initial model on every rank
    model = GPT(size["vocab"], size["d"], size["layers"], size["heads"], size["seq"],
                args.dropout)
    torch.manual_seed(args.seed * 1000 + 1 + rank)       # per-rank dropout masks
    np.random.seed(args.seed * 1000 + 1 + rank)
    random.seed(args.seed * 1000 + 1 + rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.steps))
    data = SyntheticCorpus(size["vocab"], size["seq"], size["batch"], rank, world,
                           seed=1234 + args.seed)

    ddp = DDP(model)                                     # the same model on every rank
    ddp.register_comm_hook(None, ordered_allreduce_hook)

    # --- snapshotd ---------------------------------------------------------------------
    started = time.time()
    last, state = None, None
    if args.snapshot:
        client = SnapshotClient(job=args.job)              # $SNAPSHOTD_ENDPOINT, rank $RANK
        # The DDP wrapper: each rank stores 1/world of the replicated state (coded daemons).
        state = TrainingState(ddp, optimizer, scheduler, data=data,
                              split_replicas=not args.whole_replicas)
        client.protect(optimizer)                          # step() waits for copies in flight
        last = state.restore(client)                       # same step on every rank, or None
    # -----------------------------------------------------------------------------------
    restore_s = time.time() - started
    first = 0 if last is None else last + 1
    log_line(os.path.join(args.out, "events.jsonl"), {
        "event": "start", "rank": rank, "world": world, "attempt": attempt, "pid": os.getpid(),
        "group_rank": int(os.environ.get("GROUP_RANK", "0")), "restored": last,
        "daemon": client.endpoint if args.snapshot else None,
        "first_step": first, "restore_s": round(restore_s, 4), "time": time.time(),
        # when this process started, had imported, had its process group, had built the
        # model (wall times), and what the restore spent waiting, agreeing and loading
        "t_process": process_started(), "t_imported": _T_IMPORTED, "t_group": t_group,
        "t_built": started, "restore_parts": state.last_restore_seconds if state else {}})

    for step in range(first, args.steps):
        x, y = data.next_batch()
        loss = F.cross_entropy(ddp(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if fail_at.get(rank) == step and attempt == 0:
            os.kill(os.getpid(), signal.SIGKILL)         # test fault injection
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if args.snapshot:
            state.save(client, step)                       # --- snapshotd: async save
        if rank == 0:
            log_line(os.path.join(args.out, "loss.jsonl"), {
                "step": step, "loss": loss.item(), "time": time.time(), "attempt": attempt,
                "resumed_from": last, "pid": os.getpid()})
        if args.step_delay:
            time.sleep(args.step_delay)

    if args.snapshot:
        client.close()                                     # --- snapshotd: flush and close
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(args.out, "final.pt"))
        log_line(os.path.join(args.out, "events.jsonl"),
                 {"event": "done", "rank": rank, "steps": args.steps, "time": time.time()})
    # Every rank leaves together, and DDP's reducer (which holds the process group and its
    # hook) goes before the group: a rank that tore down gloo while DDP still held it was
    # seen aborting at exit ("terminate called without an active exception") now and then.
    dist.barrier()
    del ddp
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

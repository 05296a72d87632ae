"""CPU per save: trainer process plus daemon process CPU time for one snapshot of a GPT-like
model with Adam (~450 tensors), against the CPU of copying the state's bytes once.

Target (docs/design.md section 8): trainer + daemon CPU per save <= 3x the copy + 3 ms.

The trainer saves through :class:`TrainingState` (model, AdamW, scheduler, RNGs, data position)
every "step" without training in between (so only the save is measured), waiting for each to
commit; CPU is process CPU time (every thread) of the trainer, and of the daemon read from
``/proc`` through psutil, over the same saves. The baseline copies every tensor of the same
state once into preallocated memory (``copy_``), measured in the same run, with one torch
thread.

    python -m bench.savecpu [--saves 40] [--profile DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import statistics
import tempfile
import time
from typing import Any

import psutil
import torch

from snapshotd.tools.localcluster import LocalCluster
from snapshotd_client import SnapshotClient, TrainingState

__all__ = ["gpt_like", "savecpu_case"]

MIB = 1 << 20


def gpt_like(layers: int = 9, d: int = 128, vocab: int = 2048, seq: int = 128
             ) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    """A GPT-like model (embeddings, ``layers`` transformer blocks, head) with AdamW whose
    state exists (one step taken): 113 parameters and 339 optimizer tensors at 9 layers."""
    torch.manual_seed(0)

    class GPT(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = torch.nn.Embedding(vocab, d)
            self.pos = torch.nn.Embedding(seq, d)
            self.blocks = torch.nn.ModuleList(
                torch.nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
                for _ in range(layers))
            self.norm = torch.nn.LayerNorm(d)
            self.head = torch.nn.Linear(d, vocab, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
            for block in self.blocks:
                h = block(h)
            return self.head(self.norm(h))

    model = GPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100)
    model(torch.randint(0, vocab, (2, 16))).float().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer, scheduler


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _copy_cpu(tensors: list[torch.Tensor], repeats: int) -> list[float]:
    """Process CPU seconds of copying ``tensors`` once into preallocated memory."""
    dst = [torch.empty_like(t) for t in tensors]
    out = []
    for _ in range(repeats + 1):
        started = time.process_time()
        with torch.no_grad():
            for d, s in zip(dst, tensors):
                d.copy_(s)
        out.append(time.process_time() - started)
    return out[1:]


def savecpu_case(saves: int = 40, repeats: int = 3, layers: int = 9, d: int = 128,
                 profile: str | None = None) -> dict[str, Any]:
    """Median CPU per save (trainer, daemon, total) over ``repeats`` runs of ``saves`` saves.

    Runs with one torch thread (what torchrun gives each worker by default): a copy spread
    over OpenMP threads costs more CPU than the bytes (spinning threads), in both columns."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _savecpu(saves, repeats, layers, d, profile)
    finally:
        torch.set_num_threads(threads)


def _savecpu(saves: int, repeats: int, layers: int, d: int, profile: str | None
             ) -> dict[str, Any]:
    model, optimizer, scheduler = gpt_like(layers, d)
    position = {"epoch": 0, "offset": 0}
    state = TrainingState(model, optimizer, scheduler, data=position)
    tensors = _tensors(state.state_dict(step=0))
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    cluster = LocalCluster(1, tempfile.mkdtemp(prefix="snapbench-cpu-"),
                           args=["--memory-limit", str(8 * nbytes + 256 * MIB),
                                 "--log-level", "WARNING"])
    cluster.start()
    trainer, daemon = [], []
    try:
        proc = psutil.Process(cluster.daemons[0].pid)
        with SnapshotClient(cluster.specs[0].control, job="bench-cpu", rank=0) as client:
            client.protect(optimizer, model)
            step = 0
            for _ in range(3):                        # warm: segment pool, caches
                state.save(client, step).result()
                step += 1
            prof = cProfile.Profile() if profile else None
            for _ in range(repeats):
                client.wait()
                d0, t0 = proc.cpu_times(), time.process_time()
                if prof is not None:
                    prof.enable()
                for _ in range(saves):
                    state.save(client, step)
                    client.wait()
                    step += 1
                if prof is not None:
                    prof.disable()
                t1, d1 = time.process_time(), proc.cpu_times()
                trainer.append((t1 - t0) / saves)
                daemon.append((d1.user + d1.system - d0.user - d0.system) / saves)
            if prof is not None and profile is not None:
                os.makedirs(profile, exist_ok=True)
                prof.dump_stats(os.path.join(profile, "trainer.prof"))
            committed = client.stats().committed
    finally:
        cluster.stop()
    copy = _copy_cpu(tensors, repeats * 3)
    total = [a + b for a, b in zip(trainer, daemon)]
    copy_med = statistics.median(copy)
    return {"tensors": len(tensors), "bytes": nbytes, "saves": saves, "committed": committed,
            "trainer_cpu": statistics.median(trainer), "daemon_cpu": statistics.median(daemon),
            "total_cpu": statistics.median(total), "total_min": min(total),
            "total_max": max(total), "copy_cpu": copy_med,
            "target_cpu": 3 * copy_med + 3e-3}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.savecpu", description=__doc__)
    ap.add_argument("--saves", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--profile", default=None, help="write the trainer's cProfile here")
    args = ap.parse_args()
    r = savecpu_case(args.saves, args.repeats, args.layers, args.d, args.profile)
    print(f"{r['tensors']} tensors, {r['bytes'] / MIB:.1f} MiB: trainer "
          f"{r['trainer_cpu'] * 1e3:.2f} ms + daemon {r['daemon_cpu'] * 1e3:.2f} ms = "
          f"{r['total_cpu'] * 1e3:.2f} ms CPU per save; copy once {r['copy_cpu'] * 1e3:.2f} ms; "
          f"target {r['target_cpu'] * 1e3:.2f} ms: "
          f"{'met' if r['total_cpu'] <= r['target_cpu'] else 'MISSED'}")


if __name__ == "__main__":
    main()

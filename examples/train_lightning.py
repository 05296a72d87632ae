"""A tiny model trained by PyTorch Lightning (DDP on gloo, CPU) under torchrun, snapshotted
every step by snapshotd and resumed from the daemons' memory.

The snapshotd part is three lines (marked ``# snapshotd``)::

    snapshotd --node-slot 0 --control ipc:///tmp/snapshotd.sock &
    export SNAPSHOTD_ENDPOINT=ipc:///tmp/snapshotd.sock TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    torchrun --nproc-per-node=2 --max-restarts=3 --rdzv-backend=c10d \\
        --rdzv-endpoint=127.0.0.1:29500 examples/train_lightning.py --out run1

Made-up regression data, shuffled every epoch (Lightning's DistributedSampler); dropout is on,
so the resume is exact only if the data position, the sampler's epoch and the RNG states come
back. Each rank appends its per-step losses to ``OUT/loss.jsonl``; at the end rank 0 writes the
model's and the optimizer's state to ``OUT/final.pt``. Test flags: ``--fail-at RANK:STEP`` (that
rank SIGKILLs itself after step STEP, on the first attempt only, once every rank's snapshot of
STEP is committed); ``--no-snapshot`` (the reference run, without snapshotd). Benchmark flag
(``python -m bench frameworks``): ``--framework-checkpoint DIR`` (with ``--no-snapshot``):
Lightning's own checkpoint every step instead (``ModelCheckpoint(every_n_train_steps=1)``, the
newest one kept).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from snapshotd_client.lightning import SnapshotdCallback  # snapshotd


def attempt() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


class Regressor(L.LightningModule):
    def __init__(self, losses: Path) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(),
                                       torch.nn.Dropout(0.2), torch.nn.Linear(32, 1))
        self.losses = losses

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        with open(self.losses, "a") as f:
            f.write(json.dumps({"rank": self.global_rank, "step": self.global_step + 1,
                                "loss": loss.item().hex(), "time": time.time(),
                                "attempt": attempt()}) + "\n")
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.7)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler,
                                                         "interval": "step"}}


class FailAt(L.Callback):
    """Test fault injection: after step ``step`` is committed on every rank, ``rank`` dies."""

    def __init__(self, rank: int, step: int, snap: SnapshotdCallback) -> None:
        self.rank, self.step, self.snap = rank, step, snap

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and attempt() == 0:
            self.snap.client.wait()          # this rank's snapshot of the step is committed
            dist.barrier()                   # ... and every other rank's
            if trainer.global_rank == self.rank:
                os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--job", default=None)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--size", default="tiny")            # accepted for the test harness
    ap.add_argument("--fail-at", default=None, metavar="RANK:STEP")
    ap.add_argument("--no-snapshot", action="store_true")
    ap.add_argument("--framework-checkpoint", default=None, metavar="DIR",
                    help="Lightning's own checkpoint every step, into DIR (benchmark)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)

    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(args.samples, 8, generator=gen)
    data = TensorDataset(x, x.sum(1, keepdim=True).sin())
    loader = DataLoader(data, batch_size=4, shuffle=True)
    model = Regressor(out / "loss.jsonl")
    callbacks: list[L.Callback] = []
    snap = None
    if not args.no_snapshot:
        callbacks.append(snap := SnapshotdCallback(job=args.job))                   # snapshotd
        if args.fail_at:
            rank, step = map(int, args.fail_at.split(":"))
            callbacks.append(FailAt(rank, step, snap))
    if args.framework_checkpoint:     # Lightning's own checkpoint every step (benchmark)
        callbacks.append(L.callbacks.ModelCheckpoint(dirpath=args.framework_checkpoint,
                                                     every_n_train_steps=1))
    world = int(os.environ.get("WORLD_SIZE", 1))
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto",
                        max_epochs=args.epochs, callbacks=callbacks, deterministic=True,
                        logger=False, enable_checkpointing=bool(args.framework_checkpoint),
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(out / "lightning"))
    resume = snap.resume_path() if snap is not None else None                       # snapshotd
    with open(out / "events.jsonl", "a") as f:
        f.write(json.dumps({"event": "start", "rank": int(os.environ.get("RANK", 0)),
                            "attempt": attempt(),
                            "restored": snap.restored_step if snap else None}) + "\n")
    trainer.fit(model, loader, ckpt_path=resume)
    if trainer.global_rank == 0:
        torch.save({"model": model.state_dict(),
                    "optimizer": trainer.optimizers[0].state_dict()}, out / "final.pt")
    if snap is not None:
        snap.client.close()


if __name__ == "__main__":
    main()

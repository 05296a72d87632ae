"""A tiny GPT-2 trained by the Hugging Face ``Trainer`` (DDP on gloo, CPU) under torchrun,
snapshotted every step by snapshotd and resumed from the daemons' memory.

The snapshotd part is three lines (marked ``# snapshotd``)::

    snapshotd --node-slot 0 --control ipc:///tmp/snapshotd.sock &
    export SNAPSHOTD_ENDPOINT=ipc:///tmp/snapshotd.sock TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    torchrun --nproc-per-node=2 --max-restarts=3 --rdzv-backend=c10d \\
        --rdzv-endpoint=127.0.0.1:29500 examples/train_hf.py --out run1

The model is built from a config (no download) and trained on made-up token sequences; dropout
is on, so the resume is exact only if the RNG states come back. Each rank appends its per-step
losses to ``OUT/loss.jsonl``; at the end rank 0 writes the model's and the optimizer's state to
``OUT/final.pt``. Test flags: ``--fail-at RANK:STEP`` (that rank SIGKILLs itself after step
STEP, on the first attempt only, once every rank's snapshot of STEP is committed);
``--no-snapshot`` (the reference run, without snapshotd). Benchmark flag (``python -m bench
frameworks``): ``--framework-checkpoint DIR`` (with ``--no-snapshot``): the Trainer's own
checkpoint every step instead (``save_strategy="steps", save_steps=1``, the newest one kept).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from snapshotd_client.hf import SnapshotdCallback  # snapshotd

SEQ, VOCAB = 16, 64


class Tokens(torch.utils.data.Dataset):
    """Made-up token sequences, the same in every process (seeded)."""

    def __init__(self, n: int) -> None:
        gen = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class LossLog(Trainer):
    """The Trainer, recording every step's loss exactly (``float.hex``)."""

    def __init__(self, *a, losses: Path, **kw) -> None:
        super().__init__(*a, **kw)
        self.losses = losses

    def compute_loss(self, model, inputs, *a, **kw):
        loss = super().compute_loss(model, inputs, *a, **kw)
        value = loss[0] if isinstance(loss, tuple) else loss
        with open(self.losses, "a") as f:
            f.write(json.dumps({"rank": self.args.process_index, "step": self.state.global_step + 1,
                                "loss": value.item().hex(), "time": time.time(),
                                "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))})
                    + "\n")
        return loss


class FailAt(TrainerCallback):
    """Test fault injection: after step ``step`` is committed on every rank, ``rank`` dies."""

    def __init__(self, rank: int, step: int, snap: SnapshotdCallback) -> None:
        self.rank, self.step, self.snap = rank, step, snap

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            self.snap.client.wait()          # this rank's snapshot of the step is committed
            dist.barrier()                   # ... and every other rank's
            if args.process_index == self.rank:
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
                    help="the Trainer's own checkpoint every step, into DIR (benchmark)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    saving = {"save_strategy": "no", "output_dir": str(out / "hf")}
    if args.framework_checkpoint:     # the Trainer's own checkpoint every step (benchmark)
        saving = {"save_strategy": "steps", "save_steps": 1, "save_total_limit": 1,
                  "output_dir": args.framework_checkpoint}
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    training = TrainingArguments(
        **saving, per_device_train_batch_size=4, num_train_epochs=args.epochs,
        learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=2, seed=0, use_cpu=True,
        ddp_backend="gloo", logging_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0)
    trainer = LossLog(model, training, train_dataset=Tokens(args.samples),
                      losses=out / "loss.jsonl")
    snap = None
    if not args.no_snapshot:
        trainer.add_callback(snap := SnapshotdCallback(job=args.job))               # snapshotd
        if args.fail_at:
            rank, step = map(int, args.fail_at.split(":"))
            trainer.add_callback(FailAt(rank, step, snap))
    resume = snap.resume(trainer) if snap is not None else None                     # snapshotd
    with open(out / "events.jsonl", "a") as f:
        f.write(json.dumps({"event": "start", "rank": training.process_index,
                            "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
                            "restored": snap.restored_step if snap else None}) + "\n")
    trainer.train(resume_from_checkpoint=resume)
    if training.process_index == 0:
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        torch.save({"model": trainer.model.state_dict(), "optimizer": optimizer.state_dict()},
                   out / "final.pt")
    if snap is not None:
        snap.client.close()


if __name__ == "__main__":
    main()

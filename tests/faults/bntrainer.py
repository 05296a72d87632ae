"""A real training process whose forward changes module buffers in place (BatchNorm running
statistics, a step counter buffer): the fault campaign kills it mid-step and checks that the
snapshot it restores is exactly the state at that step's ``save()``.

Training is deterministic (fixed seeds, data drawn from the step number, one thread), so the
state after step ``s`` can be recomputed from scratch by a fresh process::

    python bntrainer.py train --endpoint E --job J [--steps N]   {"saved": s} per save(),
                                                                 {"committed": s} once done
    python bntrainer.py check --endpoint E --job J               {"step": s, "exact": true}

``train`` saves after every step through ``TrainingState`` (which protects the optimizer and
the model) and at once starts the next step's forward, which updates the buffers while the
background copy of the previous step runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading

import torch

from snapshotd_client import SnapshotClient, TrainingState

_SAY = threading.Lock()


def say(record: dict) -> None:
    """One JSON line, written whole: the save worker's callback prints from another thread
    (two prints could interleave into one line the test cannot parse)."""
    with _SAY:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()

WIDTH = 512


class Counted(torch.nn.Module):
    """A module with a buffer its forward bumps in place (like num_batches_tracked)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.seen.add_(x.detach().abs().mean(0))
        return x


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    torch.manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.BatchNorm1d(WIDTH),
                                Counted(), torch.nn.ReLU(), torch.nn.Linear(WIDTH, WIDTH),
                                torch.nn.BatchNorm1d(WIDTH), torch.nn.Linear(WIDTH, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), {"next": 0}


def forward_backward(model: torch.nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(64, WIDTH, generator=g)
    model(x).pow(2).mean().backward()


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    forward_backward(model, step)
    opt.step()
    opt.zero_grad()


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=("train", "check"))
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--steps", type=int, default=100_000)
    args = ap.parse_args(argv)
    model, opt, position = build()
    state = TrainingState(model, opt, data=position, rng=False)
    client = SnapshotClient(args.endpoint, job=args.job, rank=0)
    if args.cmd == "train":
        last = state.restore(client)
        start = 0 if last is None else last + 1
        # The forward of step s+1 starts right after save(s): it updates the buffers while
        # save(s) is still being copied; optimizer.step() waits for that copy.
        for step in range(start, start + args.steps):
            if step == start:
                forward_backward(model, step)
            opt.step()
            opt.zero_grad()
            position["next"] = step + 1
            future = state.save(client, step)
            say({"saved": step})
            future.add_done_callback(
                lambda f, s=step: f.exception() is None and say({"committed": s}))
            forward_backward(model, step + 1)
        client.close()
        return 0
    restored = state.restore(client)
    client.close()
    if restored is None:
        print(json.dumps({"step": None}), flush=True)
        return 0
    got = {k: v.clone() for k, v in model.state_dict().items()}
    got_opt = opt.state_dict()
    ref, ref_opt, _ = build()
    for step in range(restored + 1):
        train_step(ref, ref_opt, step)
    diff = [k for k, v in ref.state_dict().items() if not torch.equal(v, got[k])]
    for pid, st in ref_opt.state_dict()["state"].items():
        diff += [f"opt/{pid}/{k}" for k, v in st.items()
                 if not torch.equal(torch.as_tensor(v), torch.as_tensor(got_opt["state"][pid][k]))]
    if position != {"next": restored + 1}:
        diff.append(f"data position {position}")
    print(json.dumps({"step": restored, "exact": not diff, "diff": diff[:8]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

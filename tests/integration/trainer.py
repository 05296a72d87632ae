"""A trainer process for the integration tests: saves deterministic state, or restores and checks.

    python trainer.py save --steps 1 5 [--hang-step 6 --marker FILE]
    python trainer.py restore [--step N]      prints one JSON line: {"step": N, "exact": true}

The state of (rank, step) is regenerated from a seed, so a new process can check a restore
bit for bit. ``--hang-step`` is fault injection for the tests: the copy of that step stops after
its first tensor (at save() or in the background, wherever it is copied), writes the marker
file and waits to be killed.
"""

import argparse
import json
import os
import sys
import time

import torch

import snapshotd_client
from snapshotd_client import SnapshotClient


def make_state(rank: int, step: int, mib: float, tensors: int = 8) -> dict:
    g = torch.Generator().manual_seed(rank * 100_003 + step)
    per = max(1, int(mib * (1 << 20)) // 4 // tensors)
    return {"params": {f"w{i}": torch.randn(per, generator=g) for i in range(tensors)},
            "ints": torch.randint(0, 1 << 30, (17,), generator=g, dtype=torch.int64),
            "step": step, "rank": rank, "note": f"rank {rank} step {step}",
            "nested": [1, (2.5, None), {"k": True}]}


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    return a == b


def hang_after_first_tensor(marker: str) -> None:
    """The next copy into daemon memory stops after its first tensor (views into a segment are
    cached per layout, so the hook is on the views handed to the copy, not on their making)."""
    real = snapshotd_client._client._MapCache.views

    class Hanging(list):
        """The views, but reaching the second one (by index or iteration) hangs."""

        def __getitem__(self, i):
            if i == 1:
                with open(marker, "w") as fh:
                    fh.write(str(os.getpid()))
                time.sleep(3600)
            return super().__getitem__(i)

        def __iter__(self):
            return (self[i] for i in range(len(self)))

    def views(self, path, nbytes, layout, mapping=None):
        mm, got = real(self, path, nbytes, layout, mapping)
        return mm, Hanging(got)

    real_some = snapshotd_client._client._MapCache.some_views

    def some_views(self, path, layout, mm, indices):      # the copy made at save()
        got = real_some(self, path, layout, mm, indices)
        if len(got) > 1:
            got[0].copy_(torch.ones_like(got[0]))        # a first tensor written, then stop
            Hanging(got)[1]
        return got

    snapshotd_client._client._MapCache.some_views = some_views

    snapshotd_client._client._MapCache.views = views


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["save", "restore"])
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--job", default="test")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--mib", type=float, default=64)
    ap.add_argument("--steps", type=int, nargs=2, default=(1, 5))
    ap.add_argument("--hang-step", type=int)
    ap.add_argument("--marker")
    ap.add_argument("--step", type=int)
    ap.add_argument("--timeout", type=float, default=30)
    args = ap.parse_args()
    from datetime import timedelta
    client = SnapshotClient(args.endpoint, job=args.job, rank=args.rank,
                            timeout=timedelta(seconds=args.timeout))
    if args.mode == "save":
        for step in range(args.steps[0], args.steps[1] + 1):
            client.save(step, make_state(args.rank, step, args.mib)).result()
        print(json.dumps({"saved": list(range(args.steps[0], args.steps[1] + 1))}), flush=True)
        if args.hang_step is not None:
            hang_after_first_tensor(args.marker)
            client.save(args.hang_step, make_state(args.rank, args.hang_step, args.mib)).result()
        client.close()
        return 0
    try:
        restored = client.restore(args.step)
    except snapshotd_client.SnapshotError as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), flush=True)
        return 3
    if restored is None:
        print(json.dumps({"step": None}), flush=True)
        return 0
    step, state = restored
    exact = equal(make_state(args.rank, step, args.mib), state)
    print(json.dumps({"step": step, "exact": exact}), flush=True)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

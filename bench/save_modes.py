"""Training-thread cost of save() per copy mode, against a baseline measured in the same run.

    python -m bench.save_modes [--endpoint ipc://...]    (starts its own daemon if none given)

Cases: a BatchNorm MLP (buffers copied at save() in ``auto``), and 10,000 small tensors
(laying out the state). Prints the median time of the ``save()`` call per mode, and its ratio
to ``lazy`` (the previous behaviour: nothing copied on the training thread) and to
``torch.save`` into memory (the eager baseline a user would otherwise write).
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
import uuid

import torch

from snapshotd.tools.localcluster import LocalCluster
from snapshotd_client import SnapshotClient, TrainingState


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[m for _ in range(4) for m in (
        torch.nn.Linear(2048, 2048), torch.nn.BatchNorm1d(2048), torch.nn.ReLU())])


def _median_save_ms(save, client: SnapshotClient | None, repeats: int) -> float:
    """Median time of the ``save()`` call alone; the previous save is finished untimed."""
    times = []
    for _ in range(repeats + 1):
        if client is not None:
            client.wait()
        started = time.perf_counter()
        save()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times[1:])


BN = "BatchNorm MLP 4x2048 + AdamW (200 MiB)"
MANY = "10,000 tensors of 16 bytes"


def run(endpoint: str, repeats: int = 15) -> list[tuple[str, str, float]]:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(64, 2048)).sum().backward()
    opt.step()
    state = TrainingState(model, opt, rng=False)
    many = {f"t{i}": torch.zeros(4) for i in range(10_000)}
    rows = []
    for mode in ("lazy", "auto", "eager"):
        with SnapshotClient(endpoint, job=f"bench-{uuid.uuid4().hex[:6]}", rank=0,
                            copy=mode) as client:
            steps = iter(range(10 ** 6))
            rows.append((BN, mode, _median_save_ms(
                lambda c=client, s=steps: state.save(c, next(s)), client, repeats)))
            rows.append((MANY, mode, _median_save_ms(
                lambda c=client, s=steps: c.save(next(s), many), client, repeats)))
    buf = io.BytesIO()
    sd = {"model": model.state_dict(), "opt": opt.state_dict()}

    def torch_save() -> None:
        buf.seek(0)
        torch.save(sd, buf)

    rows.append((BN, "torch.save to memory", _median_save_ms(torch_save, None, 5)))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    cluster = None
    endpoint = args.endpoint
    if endpoint is None:
        cluster = LocalCluster(1, tempfile.mkdtemp(), args=["--memory-limit", "4GiB",
                                                             "--keep", "1"])
        cluster.start()
        endpoint = cluster.specs[0].control
    try:
        rows = run(endpoint, args.repeats)
    finally:
        if cluster is not None:
            cluster.stop()
    base = {name: ms for name, mode, ms in rows if mode == "lazy"}
    print(f"{'case':45s} {'mode':22s} {'save() ms':>10s} {'vs lazy':>8s}")
    for name, mode, ms in rows:
        print(f"{name:45s} {mode:22s} {ms:10.2f} {ms / base[name]:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

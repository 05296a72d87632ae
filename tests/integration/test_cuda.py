"""The CUDA path of save: device-to-host on a side stream into pinned shared memory.

Runs where a GPU is present (skipped, with the reason, elsewhere)."""

import pytest
import torch

from snapshotd_client import SnapshotClient

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")]


def test_cuda_state_round_trips_and_optimizer_waits_for_the_copy(node):
    spec = node.specs[0]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.Linear(4096, 1024)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with SnapshotClient(spec.control, job="gpu", rank=0) as client:
        client.protect(opt)
        x = torch.randn(256, 1024, device="cuda")
        model(x).sum().backward()
        opt.step()
        expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        future = client.save(1, {"model": model.state_dict(), "opt": opt.state_dict()})
        for _ in range(3):                      # train on while the copy runs
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()                          # waits for the copy of step 1 first
        assert future.result(timeout=60) == 1
        step, state = client.restore()
    assert step == 1
    for key, value in expected.items():
        assert state["model"][key].device.type == "cpu"
        assert torch.equal(state["model"][key], value), key


def test_cuda_buffers_copied_at_save_and_restore_fills_device_tensors(node):
    """copy='auto' on a GPU: BatchNorm buffers (changed by the next forward) are cloned on the
    device at save(); parameters go through the side stream; restore(into=) fills the CUDA
    tensors of the live model in place, after checking them."""
    from snapshotd_client import TrainingState

    spec = node.specs[0]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.BatchNorm1d(512),
                                torch.nn.Linear(512, 512)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = TrainingState(model, opt, rng=False)
    x = torch.randn(64, 512, device="cuda")
    with SnapshotClient(spec.control, job="gpubn", rank=0) as client:
        for step in range(5):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            future = state.save(client, step)
            model(x).pow(2).mean().backward()         # changes the buffers during the copy
            assert future.result(timeout=60) == step
            _, snap = client.restore(step=step)
            diff = [k for k in expected if not torch.equal(expected[k], snap["model"][k])]
            assert diff == [], f"step {step}: {diff}"
        assert client.stats().eager_bytes > 0
        live = dict(model.state_dict())
        with torch.no_grad():
            for prm in model.parameters():
                prm.zero_()
        assert state.restore(client) == 4
        for key, value in model.state_dict().items():
            assert value.is_cuda and value.data_ptr() == live[key].data_ptr()
            assert torch.equal(value.cpu(), expected[key]), key

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

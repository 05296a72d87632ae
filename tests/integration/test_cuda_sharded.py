"""Sharded state on a GPU (issue 13): FSDP2 parameters and AdamW moments as CUDA DTensors go
through the side-stream copy, and a restore fills the CUDA shards in place and rebuilds the
moments on the GPU mesh. A world of one (NCCL), a real daemon.

Runs where a GPU is present (skipped, with the reason, elsewhere). Passed on an NVIDIA H200
(torch 2.11, CUDA 13) on 2026-11-27, with tests/integration/test_cuda.py."""

import pytest
import torch
import torch.distributed as dist

from snapshotd.tools.localcluster import free_ports
from snapshotd_client import SnapshotClient, TrainingState

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")]


def fsdp_job(mesh, seed):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(),
                                torch.nn.Linear(4096, 1024)).cuda()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def local_state(model, optimizer):
    out = {f"param/{k}": v.to_local().detach().cpu().clone()
           for k, v in model.named_parameters()}
    for i, moments in enumerate(optimizer.state.values()):
        for key, value in moments.items():
            value = value.to_local() if hasattr(value, "to_local") else value
            out[f"{key}/{i}"] = value.detach().cpu().clone()
    return out


def test_fsdp2_cuda_shards_copied_in_the_background_and_restored_in_place(node):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    port = free_ports(1)[0]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1, device_id=torch.device("cuda", 0))
    try:
        mesh = init_device_mesh("cuda", (1,), mesh_dim_names=("dp",))
        model, optimizer = fsdp_job(mesh, seed=0)
        state = TrainingState(model, optimizer, rng=False)
        x = torch.randn(256, 1024, device="cuda")
        with SnapshotClient(node.specs[0].control, job="gpu-fsdp", rank=0) as client:
            for step in range(4):
                model(x).pow(2).mean().backward()
                optimizer.step()
                optimizer.zero_grad()
                expected = local_state(model, optimizer)
                future = state.save(client, step)
                model(x).pow(2).mean().backward()     # overlaps the side-stream copy
                assert future.result(timeout=60) == step
                _, snap = client.restore(step=step, meshes=[mesh])
                got = {f"param/{k}": v.to_local().cpu() for k, v in snap["model"].items()}
                assert all(torch.equal(got[k], expected[k]) for k in got), step
                optimizer.zero_grad()
            assert client.stats().eager_bytes == 0 and client.stats().failed == 0

            model2, optimizer2 = fsdp_job(mesh, seed=1)
            live = {k: v.to_local().data_ptr() for k, v in model2.state_dict().items()}
            assert TrainingState(model2, optimizer2, rng=False).restore(client) == 3
        for key, value in model2.state_dict().items():
            assert value.to_local().is_cuda and value.to_local().data_ptr() == live[key]
        moments = next(iter(optimizer2.state.values()))
        assert isinstance(moments["exp_avg"], DTensor) and moments["exp_avg"].is_cuda
        got = local_state(model2, optimizer2)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)
        for m, o in ((model, optimizer), (model2, optimizer2)):
            m(x).pow(2).mean().backward()
            o.step()
        a, b = local_state(model, optimizer), local_state(model2, optimizer2)
        assert all(torch.equal(a[k], b[k]) for k in a)
    finally:
        dist.destroy_process_group()

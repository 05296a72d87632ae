"""Issue 15, per-save cost: what a save keeps per structure gives exactly what the uncached path
gives, and is dropped when the structure changes. DTensor records and the mesh table
(``LayoutCache``) against ``flatten``.

Single process, a gloo world of one (a real ``DeviceMesh``, real ``fully_shard``); 4 ranks with
shards at non-zero offsets go through the same caches in tests/integration/test_sharded_state.py.
"""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from snapshotd.tools.localcluster import free_ports
from snapshotd_client._flatten import LayoutCache, flatten

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def mesh():
    port = free_ports(1)[0]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    # Dimension names of its own: DTensor's sharding propagation caches specs (meshes) by
    # value, so a "dp" mesh here would turn up in test_flatten_dtensor.py's tensors.
    yield init_device_mesh("cpu", (1,), mesh_dim_names=("cache_dp",))
    dist.destroy_process_group()


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(4, 8)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))
        self.norm = torch.nn.LayerNorm(8)
        self.register_buffer("scale", torch.ones(8))

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x).relu()
        return self.norm(x) * self.scale


def fsdp_net(mesh, seed=0):
    torch.manual_seed(seed)
    model = Net()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def backward(model):
    model(torch.randn(3, 4)).pow(2).mean().backward()


def assert_same_layout(got, want):
    """Two layouts that would store the same bytes with the same table and metadata."""
    assert got.meta == want.meta
    assert got.entries == want.entries and got.nbytes == want.nbytes
    assert [(t.data_ptr(), t.dtype, t.shape, t.stride()) for t in got.tensors] == [
        (t.data_ptr(), t.dtype, t.shape, t.stride()) for t in want.tensors]
    assert got.sharding == want.sharding
    assert {i: id(t) for i, t in got.dtensors.items()} == {i: id(t) for i, t in
                                                           want.dtensors.items()}


# ------------------------------------------------------------------ DTensor layouts


def test_layout_cache_lays_dtensors_out_exactly_as_flatten(mesh):
    model = fsdp_net(mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cache = LayoutCache()
    for step in range(4):
        backward(model)
        optimizer.step()
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "step": step, "tied": model.inp.weight}
        assert_same_layout(cache.flatten(state), flatten(state))
    assert cache.hits == 3


@pytest.mark.parametrize("change", ["placement", "mesh", "stride", "local shape", "dtype"])
def test_a_dtensor_of_another_layout_is_laid_out_afresh(mesh, change):
    """On a mesh of one rank a Shard(0) and a Replicate() tensor of one shape have the same
    local tensor: only the DTensor part of the signature tells them apart."""
    torch.manual_seed(0)
    base = torch.randn(4, 6)
    a = distribute_tensor(base, mesh, [Shard(0)])
    if change == "placement":
        b = distribute_tensor(base, mesh, [Replicate()])
    elif change == "mesh":
        b = distribute_tensor(base, init_device_mesh("cpu", (1,), mesh_dim_names=("cache_tp",)),
                              [Shard(0)])
    elif change == "stride":
        b = distribute_tensor(base.t().contiguous(), mesh, [Replicate()]).t()
        a = distribute_tensor(base, mesh, [Replicate()])
    elif change == "local shape":
        b = distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)])
    else:
        b = distribute_tensor(base.double(), mesh, [Shard(0)])
    cache = LayoutCache()
    first = cache.flatten({"x": a, "n": 1})
    assert_same_layout(cache.flatten({"x": a, "n": 2}), flatten({"x": a, "n": 2}))
    assert cache.hits == 1
    changed = cache.flatten({"x": b, "n": 3})
    assert cache.hits == 1
    assert_same_layout(changed, flatten({"x": b, "n": 3}))
    # What is stored shows the change (the record, the mesh table or the table).
    assert (changed.meta, changed.entries) != (first.meta.replace('"n":1', '"n":3'),
                                               first.entries)
    assert_same_layout(cache.flatten({"x": b, "n": 4}), flatten({"x": b, "n": 4}))
    assert cache.hits == 2



def test_a_plain_value_that_holds_the_tensor_marker_is_laid_out_as_flatten_does(mesh):
    """The skeleton's JSON is cut where the tensors' nodes go (a marker string): a string of
    the state that holds the marker, as a value or a key, is laid out afresh, not cut."""
    from snapshotd_client._flatten import _HOLE

    t = distribute_tensor(torch.ones(4), mesh, [Shard(0)])
    cache = LayoutCache()
    for text in ["x", _HOLE, 'a"' + _HOLE, "y"]:          # one structure: a hit only for "y"
        state = {"t": t, "s": text, "u": torch.zeros(2)}
        assert_same_layout(cache.flatten(state), flatten(state))
    assert cache.hits == 1
    cache = LayoutCache()
    for text in ["x", _HOLE, _HOLE, "y", "y"]:            # as a key: hits for the second "y"
        state = {"t": t, text: [1, t]}
        assert_same_layout(cache.flatten(state), flatten(state))
    assert cache.hits == 1

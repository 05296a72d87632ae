"""Issue 15, per-save cost: what a save keeps per structure gives exactly what the uncached path
gives, and is dropped when the structure changes. DCP's FQN mapping and option checks
(``TrainingState(state_dicts="dcp")``, ``_statedicts.DcpStateDicts``) against DCP's own
``get_state_dict``; DTensor records and the mesh table (``LayoutCache``) against ``flatten``.

Single process, a gloo world of one (a real ``DeviceMesh``, real ``fully_shard``); 4 ranks with
shards at non-zero offsets go through the same caches in tests/integration/test_sharded_state.py.
"""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from snapshotd.tools.localcluster import free_ports
from snapshotd_client import TrainingState
from snapshotd_client._flatten import LayoutCache, flatten
from snapshotd_client._statedicts import DcpStateDicts

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


def local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def assert_same_tensors(a, b, what):
    assert isinstance(a, torch.Tensor) == isinstance(b, torch.Tensor), what
    if isinstance(a, torch.Tensor):
        assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape, what
        assert torch.equal(local(a), local(b)), what
        if isinstance(a, DTensor):
            assert (a.placements, a.device_mesh, a.stride()) == (b.placements, b.device_mesh,
                                                                  b.stride()), what
    else:
        assert a == b, what


def assert_same_as_dcp(got, model, optimizer):
    """``got`` (DcpStateDicts.get) is what DCP's own functions return now: the same keys in
    the same order, the same tensors (values, placements), the same plain values."""
    if optimizer is None:
        want, want_optim = get_model_state_dict(model), None
    else:
        want, want_optim = get_state_dict(model, optimizer)
    model_sd, optim_sd = got
    assert list(model_sd) == list(want)
    for key in want:
        assert_same_tensors(model_sd[key], want[key], key)
    if optimizer is None:
        assert optim_sd is None
        return
    assert list(optim_sd) == list(want_optim)
    assert list(optim_sd["state"]) == list(want_optim["state"])
    for fqn, moments in want_optim["state"].items():
        assert list(optim_sd["state"][fqn]) == list(moments)
        for name, value in moments.items():
            assert_same_tensors(optim_sd["state"][fqn][name], value, f"{fqn}/{name}")
    assert optim_sd["param_groups"] == want_optim["param_groups"]


def assert_same_layout(got, want):
    """Two layouts that would store the same bytes with the same table and metadata."""
    assert got.meta == want.meta
    assert got.entries == want.entries and got.nbytes == want.nbytes
    assert [(t.data_ptr(), t.dtype, t.shape, t.stride()) for t in got.tensors] == [
        (t.data_ptr(), t.dtype, t.shape, t.stride()) for t in want.tensors]
    assert got.sharding == want.sharding
    assert {i: id(t) for i, t in got.dtensors.items()} == {i: id(t) for i, t in
                                                           want.dtensors.items()}


# ------------------------------------------------------------------ DCP state dicts


def test_fsdp2_state_dicts_are_dcps_as_optimizer_state_appears_and_params_are_added(mesh):
    model = fsdp_net(mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dcp = DcpStateDicts()
    backward(model)                 # gradients, no optimizer state yet: DCP adds none
    got = dcp.get(model, optimizer)
    assert got[1]["state"] == {}
    assert_same_as_dcp(got, model, optimizer)
    optimizer.step()                # the optimizer's state appears
    for _ in range(3):
        assert_same_as_dcp(dcp.get(model, optimizer), model, optimizer)
    assert dcp.hits == 3
    assert_same_as_dcp(dcp.get(model, None), model, None)     # another call: asked again
    assert dcp.hits == 3

    # A parameter added (a new module, a new parameter group): asked again, then kept.
    model.head = torch.nn.Linear(8, 2)
    optimizer.add_param_group({"params": list(model.head.parameters()), "lr": 1e-3})
    hits = dcp.hits
    assert_same_as_dcp(dcp.get(model, optimizer), model, optimizer)
    assert dcp.hits == hits
    model.head(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    got = dcp.get(model, optimizer)
    assert "head.weight" in got[0] and "head.weight" in got[1]["state"]
    assert_same_as_dcp(got, model, optimizer)
    assert dcp.hits == hits + 1

    # The same modules under another name: other keys, asked again.
    model.tail = model.head
    del model.head
    got = dcp.get(model, optimizer)
    assert "tail.weight" in got[0] and "head.weight" not in got[0]
    assert_same_as_dcp(got, model, optimizer)
    assert dcp.hits == hits + 1


def test_renamed_keys_tied_weights_and_a_warm_up_step_are_dcps(mesh):
    # DDP (looked through by name: "module." is not in the FQNs), a weight tied across two
    # modules, and an optimizer without state or gradients (DCP's warm-up step creates it).
    torch.manual_seed(0)
    inner = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False))
    inner[1].weight = inner[0].weight
    model = torch.nn.parallel.DistributedDataParallel(inner)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    dcp = DcpStateDicts()
    got = dcp.get(model, optimizer)
    assert list(got[0]) == ["0.weight", "1.weight"] and len(got[1]["state"]) == 1
    assert_same_as_dcp(got, model, optimizer)
    for _ in range(2):
        model(torch.tensor([[1, 2]])).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert_same_as_dcp(dcp.get(model, optimizer), model, optimizer)
    assert dcp.hits == 2


def test_a_parameter_replaced_behind_the_optimizers_back_fails_as_dcp_fails(mesh):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dcp = DcpStateDicts()
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    assert_same_as_dcp(dcp.get(model, optimizer), model, optimizer)
    assert_same_as_dcp(dcp.get(model, optimizer), model, optimizer)
    assert dcp.hits == 1
    # Same name, same shape, another object: the optimizer's parameter has no name now.
    model[0].weight = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(KeyError) as dcps:
        get_state_dict(model, optimizer)
    with pytest.raises(KeyError) as ours:
        dcp.get(model, optimizer)
    assert str(ours.value) == str(dcps.value)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)   # fixed
    assert_same_as_dcp(dcp.get(model, optimizer), model, optimizer)


def test_training_state_saves_exactly_what_dcp_and_flatten_give(mesh):
    """The saved table, metadata and tensors of a TrainingState(state_dicts="dcp") save with
    every cache warm equal those of DCP's get_state_dict laid out by flatten, step after step
    (DCP's warm-up step at the first save, the optimizer's state, a parameter added)."""
    model = fsdp_net(mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    position = {"epoch": 0, "offset": 0}
    state = TrainingState(model, optimizer, scheduler, data=position, state_dicts="dcp")
    cache = LayoutCache()

    def compare(step):
        snap = state.state_dict(step)
        assert_same_layout(cache.flatten(snap), flatten(snap))
        snap = state.state_dict(step)
        dcp_model, dcp_optim = get_state_dict(model, optimizer)
        want = flatten(dict(snap, model=dcp_model, optimizer=dcp_optim))
        got = cache.flatten(snap)
        assert got.meta == want.meta and got.entries == want.entries
        assert [t.data_ptr() for t in got.tensors] == [t.data_ptr() for t in want.tensors]

    compare(0)                      # no gradients, no state: DCP's warm-up step
    for step in range(1, 5):
        backward(model)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        position["offset"] += 3
        if step == 3:
            model.head = torch.nn.Linear(8, 2)
            optimizer.add_param_group({"params": list(model.head.parameters())})
        compare(step)
    assert state._dcp.hits >= 4 and cache.hits >= 4


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

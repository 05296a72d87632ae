"""DTensor state (issue 13): a rank's local shard with the facts that place it in the global
tensor, rebuilt on a live mesh or filled in place, and refused where it does not fit.

Single process, a gloo world of one (a real ``DeviceMesh``, real ``fully_shard``); shards at
non-zero offsets, 2-D meshes and other ranks are in tests/integration/test_sharded_state.py.
"""

import copy
import json

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.testing._internal.two_tensor import TwoTensor

from snapshotd.tools.localcluster import free_ports
from snapshotd_client import TrainingState
from snapshotd_client._flatten import Placer, ShardingMismatch, flatten, unflatten

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def mesh():
    port = free_ports(1)[0]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    yield init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
    dist.destroy_process_group()


def through_snapshot(state, meshes=(), live=None):
    """Flatten, copy the bytes, rebuild: what a save and a restore do (CPU)."""
    layout = flatten(state)
    tensors = [t.clone() for t in layout.tensors]
    live_layout = flatten(live) if live is not None else None
    targets = {}
    if live_layout is not None:
        targets = {live_layout.entries[i]["name"]: t for i, t in live_layout.dtensors.items()}
    placer = Placer(layout.meta, [e["name"] for e in layout.entries],
                    [e["shape"] for e in layout.entries], targets, meshes)
    if live_layout is not None:          # restore(into=): fill the live local shards
        index = {e["name"]: i for i, e in enumerate(layout.entries)}
        for i, t in live_layout.dtensors.items():
            t.to_local().copy_(tensors[index[live_layout.entries[i]["name"]]])
    return unflatten(layout.meta, tensors, placer)


def sample(mesh):
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.nn.Parameter(distribute_tensor(torch.randn(6, 4, generator=g), mesh,
                                                  [Shard(0)])),
        "b": distribute_tensor(torch.randn(5, generator=g).to(torch.bfloat16), mesh,
                               [Replicate()]),
        "p": DTensor.from_local(torch.arange(3, dtype=torch.int64), mesh, [Partial()]),
        "plain": torch.ones(2),
    }


def test_local_shard_is_stored_with_dcp_chunk_metadata(mesh):
    state = sample(mesh)
    layout = flatten(state)
    assert [e["name"] for e in layout.entries] == ["/w", "/b", "/p", "/plain"]
    meta = json.loads(layout.meta)
    assert meta["__sharded__"]["meshes"] == [{"device": "cpu", "dims": ["dp"], "ranks": [0]}]
    w = meta["state"]["w"]
    (chunk,) = state["w"].__create_chunk_list__()          # DCP's own chunk of the shard
    assert w["offsets"] == list(chunk.offsets) and layout.entries[0]["shape"] == list(
        chunk.sizes)
    assert (w["shape"], w["placements"], w["coordinate"], w["mesh"]) == ([6, 4], ["S(0)"],
                                                                         [0], 0)
    assert meta["state"]["b"]["placements"] == ["R"] and layout.entries[1]["dtype"] == "bfloat16"
    assert meta["state"]["p"]["placements"] == ["P(sum)"]
    assert meta["state"]["plain"] == {"__tensor__": 3}
    # Nothing is copied: the layout holds the local tensors themselves.
    assert layout.tensors[0].data_ptr() == state["w"].to_local().data_ptr()


def test_dtensors_rebuilt_on_the_live_mesh_bit_exact(mesh):
    state = sample(mesh)
    back = through_snapshot(state, meshes=[mesh])
    for key in ("w", "b", "p"):
        got, want = back[key], state[key]
        assert isinstance(got, DTensor) and got.placements == want.placements
        assert got.device_mesh is mesh and got.shape == want.shape
        assert got.stride() == want.stride() and got.dtype == want.dtype
        assert torch.equal(got.to_local(), want.to_local())
        assert got.to_local().data_ptr() != want.to_local().data_ptr()
    assert torch.equal(back["plain"], state["plain"])


def test_restore_into_fills_the_live_dtensor_in_place(mesh):
    state = sample(mesh)
    live = {"w": distribute_tensor(torch.zeros(6, 4), mesh, [Shard(0)])}
    ptr = live["w"].to_local().data_ptr()
    back = through_snapshot({"w": state["w"]}, live=live)
    assert back["w"] is live["w"] and live["w"].to_local().data_ptr() == ptr
    assert torch.equal(live["w"].to_local(), state["w"].to_local())


def test_a_dtensor_record_has_its_own_stride(mesh):
    """Two DTensors alike in mesh, placements and shapes but not in stride: each record has
    its own (the records are cached by what they depend on, the stride included)."""
    a = distribute_tensor(torch.randn(4, 6), mesh, [Replicate()])
    b = distribute_tensor(torch.randn(6, 4), mesh, [Replicate()]).t()
    assert a.shape == b.shape and a.stride() != b.stride()
    layout = flatten({"a": a, "b": b})
    assert [layout.sharding[i]["stride"] for i in (0, 1)] == [list(a.stride()),
                                                               list(b.stride())]


def test_dtensors_of_one_shape_are_not_merged(mesh):
    """DTensor.data_ptr() is 0: taken as the identity of tied weights, every DTensor of one
    shape would be stored once (one moment restored as the other)."""
    a = distribute_tensor(torch.zeros(4, 4), mesh, [Shard(0)])
    b = distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)])
    layout = flatten({"exp_avg": a, "exp_avg_sq": b, "tied": a})
    assert len(layout.entries) == 2
    back = through_snapshot({"exp_avg": a, "exp_avg_sq": b, "tied": a}, meshes=[mesh])
    assert torch.equal(back["exp_avg_sq"].to_local(), torch.ones(4, 4))
    assert back["tied"] is back["exp_avg"]


@pytest.mark.parametrize("live, why", [
    ("placement", "placed \\['R'\\]"),
    ("shape", "the live tensor is global \\[8, 4\\]"),
    ("plain", "the live tensor is a plain tensor"),
])
def test_a_shard_that_does_not_fit_is_refused_naming_it(mesh, live, why):
    state = {"layer": {"w": sample(mesh)["w"]}}
    into = {"placement": {"layer": {"w": distribute_tensor(torch.zeros(6, 4), mesh,
                                                           [Replicate()])}},
            "shape": {"layer": {"w": distribute_tensor(torch.zeros(8, 4), mesh, [Shard(0)])}},
            "plain": {"layer": {"w": torch.zeros(6, 4)}}}[live]
    layout, live_layout = flatten(state), flatten(into)
    targets = {e["name"]: t for e, t in zip(live_layout.entries, live_layout.tensors)}
    targets.update({live_layout.entries[i]["name"]: t for i, t in live_layout.dtensors.items()})
    with pytest.raises(ShardingMismatch, match=f"/layer/w: .*{why}") as info:
        Placer(layout.meta, ["/layer/w"], [[6, 4]], targets, [])
    assert "issue 14" in str(info.value)


def test_without_a_live_mesh_shards_are_refused_or_returned_as_local_tensors(mesh):
    state = sample(mesh)
    layout = flatten(state)
    names, shapes = [e["name"] for e in layout.entries], [e["shape"] for e in layout.entries]
    with pytest.raises(ShardingMismatch, match="3 on the cpu mesh 1 \\('dp',\\) ranks \\[0\\] "
                                               "\\(/w, /b, /p\\)"):
        Placer(layout.meta, names, shapes, {}, [])
    placer = Placer(layout.meta, names, shapes, {}, [], local_shards=True)
    back = unflatten(layout.meta, [t.clone() for t in layout.tensors], placer)
    assert type(back["w"]) is torch.Tensor and torch.equal(back["w"], state["w"].to_local())


def test_live_dtensor_where_the_snapshot_holds_a_plain_tensor_is_refused(mesh):
    layout = flatten({"w": torch.zeros(6, 4)})
    live = {"/w": distribute_tensor(torch.zeros(6, 4), mesh, [Shard(0)])}
    with pytest.raises(ShardingMismatch, match="/w: the live tensor is a DTensor"):
        Placer(layout.meta, ["/w"], [[6, 4]], live, [mesh])


def test_structure_only_restore_shows_the_global_shape(mesh):
    layout = flatten(sample(mesh))
    back = unflatten(layout.meta, [t.to("meta") for t in layout.tensors])
    assert back["w"].is_meta and back["w"].shape == (6, 4)


def test_values_that_cannot_be_stored_are_named_at_flatten(mesh):
    with pytest.raises(TypeError, match="/opt/x: a tensor of subclass TwoTensor"):
        flatten({"opt": {"x": TwoTensor(torch.zeros(2), torch.zeros(2))}})
    with pytest.raises(TypeError, match="/m: a tensor on the meta device"):
        flatten({"m": torch.empty(3, device="meta")})


# ------------------------------------------------------------------------- TrainingState


class EMA:
    """Exponential moving average of a model's parameters (a typical extra object)."""

    def __init__(self, model, decay=0.9):
        self.model, self.decay = model, decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.updates = 0

    def update(self):
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                self.shadow[k].mul_(self.decay).add_(v, alpha=1 - self.decay)
        self.updates += 1

    def state_dict(self):
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state):
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
        self.updates = state["updates"]


def fsdp_job(mesh, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    return model, optimizer, scaler, EMA(model)


def train(model, optimizer, scaler, ema, steps):
    for _ in range(steps):
        loss = model(torch.randn(4, 6)).pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        ema.update()


@pytest.mark.parametrize("state_dicts", ["module", "dcp"])
def test_fsdp2_training_state_with_extras_resumes_bit_exact(mesh, state_dicts):
    model, optimizer, scaler, ema = fsdp_job(mesh)
    state = TrainingState(model, optimizer, extra={"scaler": scaler, "ema": ema},
                          state_dicts=state_dicts)
    train(model, optimizer, scaler, ema, 3)
    snap = state.state_dict(step=2)
    assert isinstance(snap["model"]["0.weight"], DTensor)
    optim_state = next(iter(snap["optimizer"]["state"].values()))
    assert isinstance(optim_state["exp_avg"], DTensor)
    assert snap["extra"]["scaler"]["scale"] == scaler.get_scale()
    saved = through_snapshot(snap, meshes=state.meshes())
    rng = torch.get_rng_state()
    train(model, optimizer, scaler, ema, 3)
    expected = copy.deepcopy((model.state_dict(), optimizer.state_dict(), ema.shadow,
                              scaler.state_dict()))

    # A fresh process: new model (other initial values), an optimizer without state.
    model2, optimizer2, scaler2, ema2 = fsdp_job(mesh, seed=1)
    state2 = TrainingState(model2, optimizer2, extra={"scaler": scaler2, "ema": ema2},
                           state_dicts=state_dicts)
    assert state2.load(saved) == 2 and ema2.updates == 3
    torch.set_rng_state(rng)
    train(model2, optimizer2, scaler2, ema2, 3)
    got = (model2.state_dict(), optimizer2.state_dict(), ema2.shadow, scaler2.state_dict())
    for k, v in expected[0].items():
        assert torch.equal(got[0][k].to_local(), v.to_local()), k
    for pid, moments in expected[1]["state"].items():
        for name, value in moments.items():
            value2 = got[1]["state"][pid][name]
            assert isinstance(value2, type(value)) and torch.equal(
                getattr(value2, "_local_tensor", value2), getattr(value, "_local_tensor", value))
    assert all(torch.equal(got[2][k], v) for k, v in expected[2].items())
    assert got[3] == expected[3]


def test_extra_objects_are_checked(mesh):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="extra\\['ema'\\]: a dict has no state_dict\\(\\)"):
        TrainingState(model, extra={"ema": {"shadow": 1}})
    state = TrainingState(model, extra={"ema": EMA(model)})
    snap = TrainingState(model).state_dict(step=0)
    with pytest.raises(ValueError, match="extra objects missing from the snapshot: \\['ema'\\]"):
        state.load(snap)
    with pytest.raises(ValueError, match="state_dicts='fsdp'"):
        TrainingState(model, state_dicts="fsdp")


def test_meshes_are_those_of_the_model_and_optimizer(mesh):
    model, optimizer, *_ = fsdp_job(mesh)
    assert TrainingState(model, optimizer).meshes() == [mesh]
    assert TrainingState(torch.nn.Linear(2, 2)).meshes() == []

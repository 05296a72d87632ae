"""TrainingState: everything an exact resume needs survives the snapshot format, bit for bit."""

import copy
import random
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist

from snapshotd.tools.localcluster import free_ports
from snapshotd_client import DaemonUnavailable, SnapshotError, TrainingState
from snapshotd_client._flatten import flatten, unflatten
from snapshotd_client._training import agree_step


def through_snapshot(state):
    """What a save and a restore do to a state: flatten, copy the bytes, rebuild (CPU)."""
    layout = flatten(state)
    return unflatten(layout.meta, [t.clone() for t in layout.tensors])


class Sampler:
    def __init__(self):
        self.epoch, self.offset = 0, 0

    def state_dict(self):
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state):
        self.epoch, self.offset = state["epoch"], state["offset"]


def make(data):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.3),
                                torch.nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
    return model, optimizer, scheduler, TrainingState(model, optimizer, scheduler, data=data)


def step(model, optimizer, scheduler, advance):
    x = torch.randn(5, 6)                                   # torch RNG, and dropout below
    noise = float(np.random.rand()) + random.random()       # numpy and Python RNGs
    (model(x).pow(2).mean() * (1 + noise)).backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    advance()


@pytest.mark.parametrize("kind", ["dict", "stateful"])
def test_resume_from_a_snapshot_is_bit_exact(kind):
    data = {"epoch": 0, "offset": 0} if kind == "dict" else Sampler()

    def advance():
        if kind == "dict":
            data["offset"] += 1
        else:
            data.offset += 1

    model, optimizer, scheduler, state = make(data)
    for _ in range(3):
        step(model, optimizer, scheduler, advance)
    saved = through_snapshot(state.state_dict(step=2))
    for _ in range(4):
        step(model, optimizer, scheduler, advance)
    expected = copy.deepcopy(model.state_dict())
    expected_position = dict(data) if kind == "dict" else data.state_dict()

    assert state.load(saved) == 2                           # back to just after step 2
    assert (dict(data) if kind == "dict" else data.state_dict())["offset"] == 3
    assert scheduler.last_epoch == 3
    for _ in range(4):
        step(model, optimizer, scheduler, advance)
    got = model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert (dict(data) if kind == "dict" else data.state_dict()) == expected_position


def test_format_is_checked():
    state = TrainingState(torch.nn.Linear(2, 2))
    snap = state.state_dict(7)
    assert set(snap["model"]) == {"weight", "bias"} and snap["step"] == 7
    with pytest.raises(ValueError, match="not a TrainingState snapshot"):
        state.load({"model": snap["model"]})


class FakeClient:
    rank = 0

    def __init__(self, steps):
        self._steps = steps

    def steps(self):
        if isinstance(self._steps, Exception):
            raise self._steps
        return self._steps


@pytest.fixture
def one_rank_group():
    port = free_ports(1)[0]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_wrapper_is_looked_through(one_rank_group):
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
    assert set(TrainingState(ddp).state_dict(0)["model"]) == {"weight", "bias"}


def test_agree_step_takes_the_newest_step_every_rank_holds(one_rank_group):
    assert agree_step(FakeClient([3, 9, 4])) == 9
    assert agree_step(FakeClient([])) is None
    with pytest.raises(SnapshotError, match="rank 0: DaemonUnavailable"):
        agree_step(FakeClient(DaemonUnavailable("no daemon")))


def test_every_restore_names_a_new_timeline(one_rank_group):
    from snapshotd_client._client import agree_timeline, agree_token, timeline_token

    step, token = agree_timeline(FakeClient([3, 9, 4]))
    again = agree_timeline(FakeClient([3, 9, 4]))
    assert step == again[0] == 9 and 0 < token < 1 << 63 and again[1] not in (0, token)
    assert timeline_token("j", 9) == timeline_token("j", 9) != timeline_token("j", 8)
    # Two restores of one explicit step are two timelines (review of the timelines, F3).
    assert agree_token(9) != agree_token(9)


def test_a_start_over_names_the_timeline_even_where_the_rank_holds_nothing():
    """Review of the timelines, F1: a rank without versions sent no drop, so its node kept
    no timeline, every other node counted its reports up to base -1, and no pin rose again."""
    from types import SimpleNamespace

    from snapshotd_client import _protocol as p
    from snapshotd_client._client import SnapshotClient

    sent = []
    client = SnapshotClient.__new__(SnapshotClient)
    client.job, client.rank, client._token, client.run = "j", 1, "", "r"
    client._channel = SimpleNamespace(call=lambda msg, *a, **k: sent.append(msg) or
                                      SimpleNamespace(versions=()))
    client.steps = lambda: []
    client._start_over(0x77)
    assert [m for m in sent if isinstance(m, p.Drop)] == [p.Drop("j", 1, timeline=0x77)]


def test_a_restarted_torchrun_worker_without_the_rendezvous_setting_is_warned_once(monkeypatch):
    from snapshotd_client import _client

    monkeypatch.setattr(_client, "_RDZV_WARNED", False)
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _client._check_torchrun_env()                # first attempt: nothing to say
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
        _client._check_torchrun_env()
        _client._check_torchrun_env()                # once per process
    assert len(seen) == 1 and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in str(seen[0].message)
    monkeypatch.setattr(_client, "_RDZV_WARNED", False)
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _client._check_torchrun_env()
    assert not seen


def test_a_dcp_restore_into_a_fresh_optimizer_skips_dcp_s_warm_up_step_and_is_bit_exact(
        one_rank_group):
    """A new process's optimizer holds no state: DCP's set_state_dict would first run a step
    with zero gradients to create it (0.8 s for a small FSDP2 model); TrainingState skips it,
    and the resumed run is the uninterrupted one, bit for bit. A load that fails leaves the
    optimizer without state, as it was."""
    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Linear(16, 3))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, optimizer, TrainingState(model, optimizer, state_dicts="dcp", rng=False)

    def train(model, optimizer, steps):
        for i in range(steps):
            model(torch.full((5, 6), float(i))).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()

    model, optimizer, state = fresh()
    train(model, optimizer, 3)
    saved = through_snapshot(state.state_dict(step=3))
    train(model, optimizer, 2)
    expected = copy.deepcopy(model.state_dict())

    model, optimizer, state = fresh()
    steps = []
    optimizer.register_step_pre_hook(lambda *a: steps.append(1))
    assert state.load(saved) == 3
    assert not steps                                        # no warm-up step ran
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in optimizer.state.values())
    train(model, optimizer, 2)
    got = model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    model, optimizer, state = fresh()
    broken = copy.deepcopy(saved)
    first = next(iter(broken["optimizer"]["state"]))
    broken["optimizer"]["state"].pop(first)
    broken["optimizer"]["param_groups"][0]["params"][0] = "not.a.parameter"
    with pytest.raises(RuntimeError, match="Missing optimizer state"):
        state.load(broken)
    assert not optimizer.state


def test_a_dcp_restore_of_a_parameter_that_never_got_a_gradient_is_the_saved_run(
        one_rank_group):
    """A parameter with requires_grad that received no gradient before the save (an unused
    layer, an expert no token was routed to) holds no optimizer state; DCP's strict load
    refused every restore of such a job ("Missing optimizer state"). It is restored without
    state, as it was saved, and training goes on bit for bit as the uninterrupted run,
    through the step where that parameter first gets a gradient."""
    class Gated(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = torch.nn.Linear(6, 3)
            self.late = torch.nn.Linear(6, 3)          # first used at step 4
            self.frozen = torch.nn.Linear(6, 3)        # in no optimizer below but one

        def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
            return self.used(x) + (self.late(x) if step >= 4 else 0)

    def fresh():
        torch.manual_seed(0)
        model = Gated()
        optimizer = torch.optim.AdamW([*model.used.parameters(), *model.late.parameters()],
                                      lr=1e-2)
        return model, optimizer, TrainingState(model, optimizer, state_dicts="dcp", rng=False)

    def train(model, optimizer, steps):
        for i in steps:
            model(torch.full((5, 6), float(i)), i).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()

    model, optimizer, state = fresh()
    train(model, optimizer, range(3))
    saved = through_snapshot(state.state_dict(step=2))
    assert sorted(saved["optimizer"]["state"]) == ["used.bias", "used.weight"]
    train(model, optimizer, range(3, 6))
    expected = copy.deepcopy(model.state_dict())

    # An optimizer over other parameters (the same sizes) is not this snapshot's (review of
    # session 11, F1: it was loaded, `frozen` without the state it would have had).
    model, _, _ = fresh()
    other = torch.optim.AdamW([*model.used.parameters(), *model.frozen.parameters()], lr=1e-2)
    with pytest.raises(RuntimeError, match="Missing optimizer state"):
        TrainingState(model, other, state_dicts="dcp", rng=False).load(saved)

    model, optimizer, state = fresh()
    assert state.load(saved) == 2
    assert {len(optimizer.state[p]) for p in model.late.parameters()} <= {0}
    train(model, optimizer, range(3, 6))
    got = model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)

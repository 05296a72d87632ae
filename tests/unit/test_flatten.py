"""Client-side layout: every supported value survives the trip; unsupported ones are named."""

import random

import numpy as np
import pytest
import torch

from snapshotd_client._flatten import flatten, unflatten, view_of

pytestmark = pytest.mark.timeout(30)


def round_trip(state):
    layout = flatten(state)
    buf = bytearray(max(layout.nbytes, 1))
    for tensor, entry in zip(layout.tensors, layout.entries):
        assert entry["offset"] % 64 == 0
        if entry["nbytes"]:
            view_of(buf, entry).copy_(tensor)
    tensors = [view_of(buf, e).clone() for e in layout.entries]
    return unflatten(layout.meta, tensors)


def test_plain_values_and_containers():
    state = {"i": 2**80, "f": 1.5, "nan": float("nan"), "inf": float("-inf"), "s": "é",
             "b": True, "n": None, "bytes": b"\x00\xff", "t": (1, [2, (3,)]), "l": [],
             "ints": {1: "a", (2, 3): "b"}, "__tensor__": "a key that looks like a tag"}
    back = round_trip(state)
    assert back["nan"] != back["nan"]
    del state["nan"], back["nan"]
    assert back == state
    assert isinstance(back["t"], tuple) and isinstance(back["t"][1][1], tuple)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64,
                                   torch.uint8, torch.bool, torch.complex64, torch.float64])
def test_tensors_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(3, 5, generator=g) * 100).to(dtype)
    back = round_trip({"t": t, "scalar": t[0, 0].clone(), "empty": t[:0],
                       "strided": t.t()})
    for key, ref in (("t", t), ("scalar", t[0, 0]), ("empty", t[:0]), ("strided", t.t())):
        assert back[key].dtype == ref.dtype and back[key].shape == ref.shape
        assert torch.equal(back[key].view(-1).view(torch.uint8) if dtype != torch.bool
                           else back[key], ref.contiguous().view(-1).view(torch.uint8)
                           if dtype != torch.bool else ref)


def test_rng_states_and_numpy():
    rnd = random.Random(5)
    state = {"torch": torch.get_rng_state(), "py": rnd.getstate(),
             "np": np.random.RandomState(3).get_state(), "arr": np.arange(5, dtype=np.int16),
             "np_scalar": np.float32(2.5)}
    back = round_trip(state)
    assert torch.equal(back["torch"], state["torch"])
    again = random.Random()
    again.setstate(back["py"])
    assert again.random() == rnd.random()
    rs = np.random.RandomState()
    rs.set_state(back["np"])
    assert rs.randint(1 << 30) == np.random.RandomState(3).randint(1 << 30)
    assert np.array_equal(back["arr"], state["arr"]) and back["arr"].dtype == np.int16
    assert back["np_scalar"] == np.float32(2.5) and back["np_scalar"].dtype == np.float32


def test_optimizer_and_model_state_dicts():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    back = round_trip({"model": model.state_dict(), "opt": opt.state_dict()})
    opt2 = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters())
    opt2.load_state_dict(back["opt"])
    assert opt2.state_dict()["param_groups"][0]["betas"] == (0.8, 0.9)
    for key, value in model.state_dict().items():
        assert torch.equal(back["model"][key], value)


def test_unsupported_value_is_named_by_path():
    with pytest.raises(TypeError, match="/opt/fn: cannot snapshot a value of type function"):
        flatten({"opt": {"fn": lambda: 1}})


def test_duplicate_paths_get_unique_names():
    layout = flatten({"a/b": torch.zeros(1), "a": {"b": torch.ones(1)}})
    names = [e["name"] for e in layout.entries]
    assert len(set(names)) == 2


# ------------------------------------------------------------------ LayoutCache (issue 15)

def _cache_states():
    w = torch.randn(4, 4)
    yield lambda i: {"a": w, "b": w, "step": i, "lr": 0.1 * i, "big": 2**80 + i,
                     "opt": {"state": {0: {"m": torch.ones(3) * i}, 1: {"m": torch.zeros(2)}},
                             "groups": [{"betas": (0.9, 0.99), "params": [0, 1]}]},
                     "rng": (3, tuple(range(i, i + 700)), None), "np": np.arange(4) + i,
                     "empty": torch.zeros(0), "empty2": torch.zeros(0, 3), "s": "é" * i,
                     "none": None, "flag": i % 2 == 0}
    yield lambda i: {"nan": float("nan"), "x": torch.ones(2) * i}        # falls back each time
    yield lambda i: {"b": b"\x00" * i, "t": torch.ones(1)}               # tagged: falls back
    yield lambda i: {"v": w, "row": w[0], "i": i}                        # two views, one address
    yield lambda i: [torch.ones(3), {"k": [1, 2, 3.5]}, i]


@pytest.mark.parametrize("make", list(_cache_states()))
def test_layout_cache_lays_out_exactly_as_flatten(make):
    from snapshotd_client._flatten import LayoutCache

    cache = LayoutCache()
    for i in range(4):
        state = make(i)
        want, got = flatten(state), cache.flatten(state)
        assert got.meta == want.meta and got.entries == want.entries
        assert got.nbytes == want.nbytes
        assert [(t.data_ptr(), t.dtype, t.shape) for t in got.tensors] == [
            (t.data_ptr(), t.dtype, t.shape) for t in want.tensors]


def test_layout_cache_reuses_only_the_same_structure():
    from snapshotd_client._flatten import LayoutCache

    cache = LayoutCache()
    a, b = torch.ones(3), torch.zeros(3)
    first = cache.flatten({"a": a, "b": b, "n": 1})
    again = cache.flatten({"a": a, "b": b, "n": 2})
    assert cache.hits == 1 and again.entries is first.entries and again.plan is first.plan
    tied = cache.flatten({"a": a, "b": a, "n": 2})            # a new tie: laid out afresh
    assert len(tied.entries) == 1 and tied.entries is not first.entries
    reshaped = cache.flatten({"a": a, "b": b.view(1, 3), "n": 2})
    assert reshaped.entries[1]["shape"] == [1, 3]
    retyped = cache.flatten({"a": a, "b": b.double(), "n": 2})
    assert retyped.entries[1]["dtype"] == "float64"
    moved = cache.flatten({"b": b, "a": a, "n": 2})           # key order is the layout
    assert [e["name"] for e in moved.entries] == ["/b", "/a"]
    with pytest.raises(TypeError, match="/x"):
        cache.flatten({"a": a, "x": object()})

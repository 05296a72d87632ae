"""The public client pieces the framework integrations use (issue 26): registered adapters
for objects of other types, the newest common step before a framework starts, the public RNG
capture/restore, and the Trainer integration's RNG file and epoch-carrying loader position."""

import dataclasses
import enum
import random

import numpy as np
import pytest
import torch

from snapshotd_client import capture_rng, newest_common_step, register_type, restore_rng
from snapshotd_client._flatten import flatten, unflatten


@dataclasses.dataclass
class Progress:
    epoch: int
    seen: list


class Phase(enum.Enum):
    WARMUP = "warmup"
    MAIN = "main"


register_type(Progress, dataclasses.asdict, lambda d: Progress(**d), name="test.Progress")
register_type(Phase, lambda p: p.value, Phase, name="test.Phase")


def test_registered_objects_round_trip_with_their_tensors():
    state = {"p": Progress(3, [1, torch.arange(4)]), "phase": Phase.MAIN, "w": torch.ones(2)}
    layout = flatten(state)
    assert "test.Progress" in layout.meta and "pickle" not in layout.meta
    back = unflatten(layout.meta, [t.clone() for t in layout.tensors])
    assert back["phase"] is Phase.MAIN
    assert back["p"].epoch == 3 and torch.equal(back["p"].seen[1], torch.arange(4))


def test_unregistered_types_are_refused_naming_the_way_out():
    class Other:
        pass

    with pytest.raises(TypeError, match="register_type"):
        flatten({"x": Other()})


def test_a_name_unknown_at_restore_fails_naming_it():
    class Local:
        pass

    register_type(Local, lambda _: 1, lambda _: Local(), name="test.Local")
    layout = flatten({"x": Local()})
    meta = layout.meta.replace("test.Local", "test.Gone")
    with pytest.raises(KeyError, match="test.Gone"):
        unflatten(meta, layout.tensors)


def test_a_name_taken_by_another_type_is_refused():
    class A:
        pass

    with pytest.raises(ValueError, match="registered for"):
        register_type(A, str, str, name="test.Phase")


def test_capture_and_restore_rng_cover_torch_numpy_python():
    saved = capture_rng()
    first = (torch.rand(2), np.random.rand(), random.random())
    restore_rng(saved)
    again = (torch.rand(2), np.random.rand(), random.random())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_newest_common_step_single_process(monkeypatch):
    class Held:
        def __init__(self, steps):
            self._steps = steps

        def steps(self):
            return self._steps

    monkeypatch.setenv("WORLD_SIZE", "1")
    assert newest_common_step(Held([3, 7, 5])) == 7
    assert newest_common_step(Held([])) is None


def test_hf_rng_file_is_what_the_trainer_loads(tmp_path):
    pytest.importorskip("transformers", reason="transformers not installed (extra [hf])")
    from transformers.trainer_pt_utils import safe_globals

    from snapshotd_client.hf import _hf_rng

    saved = capture_rng()
    expected = (torch.rand(3), np.random.rand(), random.random())
    torch.save(_hf_rng(saved), tmp_path / "rng.pth")
    with safe_globals():                                           # as the Trainer loads it
        loaded = torch.load(tmp_path / "rng.pth", weights_only=True)
    random.setstate(loaded["python"])
    np.random.set_state(loaded["numpy"])
    torch.random.set_rng_state(loaded["cpu"])
    assert torch.equal(torch.rand(3), expected[0])
    assert (np.random.rand(), random.random()) == expected[1:]


def test_epoch_loader_keeps_the_epoch_accelerate_omits():
    pytest.importorskip("transformers", reason="transformers not installed (extra [hf])")
    from snapshotd_client.hf import EpochLoader

    class Shard:                       # DataLoaderShard's shape: a state without the epoch
        def __init__(self):
            self.epochs, self.loaded = [], None

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

        def state_dict(self):
            return {"_iterator_finished": False}

        def load_state_dict(self, state):
            self.loaded = state

    live = EpochLoader(Shard())
    live.set_epoch(2)
    saved = live.state_dict()
    fresh = EpochLoader(Shard())
    fresh.load_state_dict(saved)
    assert fresh.epoch == 2 and fresh.loader.epochs == [2]
    assert fresh.loader.loaded == {"_iterator_finished": False}


# ---------------------------------------------------------------------- Lightning

def test_lightning_resume_sampler_sets_the_saved_epoch_skips_once_and_steps_aside():
    pytest.importorskip("lightning", reason="snapshotd_client.lightning needs lightning "
                        "(pip install -e './client[lightning]')")
    from torch.utils.data import BatchSampler, DistributedSampler

    from snapshotd_client.lightning import _ResumeSampler

    data = list(range(20))
    inner = DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=7)
    batches = BatchSampler(inner, batch_size=3, drop_last=False)
    inner.set_epoch(2)
    want = list(batches)                      # epoch 2's batches of this rank
    inner.set_epoch(0)
    batches.sampler = _ResumeSampler(batches, epoch=2, skip=2 * 3)
    batches.sampler.set_epoch(5)              # Lightning's epoch for the pass: ignored
    assert len(batches) == len(want)
    assert list(batches) == want[2:]          # the saved epoch, two batches already seen
    assert batches.sampler is inner           # later passes are the sampler's own
    inner.set_epoch(3)
    assert list(batches) == list(BatchSampler(inner, 3, False))


def test_lightning_checkpoint_io_hands_over_the_restored_checkpoint_once():
    pytest.importorskip("lightning", reason="snapshotd_client.lightning needs lightning "
                        "(pip install -e './client[lightning]')")
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from snapshotd_client import SnapshotError
    from snapshotd_client.lightning import SnapshotdCallback, SnapshotdCheckpointIO

    snap = SnapshotdCallback(job="unit")
    snap._checkpoint, snap.restored_step = {"pytorch-lightning_version": "2.6.6"}, 4
    io = SnapshotdCheckpointIO(TorchCheckpointIO(), snap)
    with pytest.raises(SnapshotError, match="resume_path"):
        io.load_checkpoint("snapshotd:3")
    assert io.load_checkpoint("snapshotd:4") == {"pytorch-lightning_version": "2.6.6"}
    with pytest.raises(SnapshotError, match="did not read"):
        io.load_checkpoint("snapshotd:4")     # handed over once, then freed
    with pytest.raises(ValueError, match="every_n_steps"):
        SnapshotdCallback(every_n_steps=0)

"""A parity holder refuses the bytes of a version its data node said it dropped (review of
issue 15, F1): a re-commit of a step tells the group at once, but what was left of the old
version's send, or a parity forward behind it, used to complete the old bytes' parity after
that notice, and a node lost then was rebuilt with the replaced bytes.

Real stores and protectors; the peer messages are handed over in memory."""

import pytest

from snapshotd.cluster import peerproto as pp
from snapshotd.cluster.codec import make_codec
from snapshotd.cluster.placement import data_stripes, group_of, make_groups
from snapshotd.cluster.protection import (
    ParityRecord,
    Protector,
    _committed_at,
    chunk_size,
    frames_checksum,
)
from snapshotd.common.protocol import TensorEntry
from snapshotd.node.store import Store, StoreError


def protector(tmp_path, groups, slot):
    store = Store(str(tmp_path / f"n{slot}"), memory_limit=1 << 22, keep=3,
                  identity=lambda pid: 1.0)
    store.open()
    return Protector(slot, group_of(slot, groups), make_codec("isal", 2, 2), store, links=None,
                     up=lambda s: True)


def commit(store, step):
    slot = store.alloc("j", 0, step, 64, 100)
    store.commit(slot.number, (TensorEntry("t", "uint8", (64,), 0, 64),), "{}")


def fragment(prot, step):
    """Node ``prot``'s first data fragment of ``step``: (stripe, PutData, frames)."""
    nv = prot.node_version("j", step)
    manifest = nv.manifest(prot.me, prot.store.owner("j"))
    stripe, _ = data_stripes(prot.me, prot.group)[0]
    length = min(chunk_size(nv.total, prot.group.k), nv.total)
    frames = nv.chunk_frames(prot.store, 0, length)
    info = pp.FragInfo(prot.me, 0, length, manifest, -1)
    return stripe, pp.PutData("j", step, stripe.index, info, frames_checksum(frames)), frames


def protectors(tmp_path):
    """The four protectors of one RS(2,2) group, by slot (test_protection_resend.py too)."""
    groups = make_groups(4, 2, 2)
    return {s: protector(tmp_path, groups, s) for s in range(4)}


@pytest.fixture
def group(tmp_path):
    return protectors(tmp_path)


def test_a_holder_refuses_a_fragment_and_parity_of_a_version_its_node_dropped(group):
    src = group[0]
    commit(src.store, 2)
    stripe, old, frames = fragment(src, 2)
    holder = group[stripe.parity[0]]
    # Step 2 committed again (a re-save): the node tells the group that its versions of step 2
    # committed before the new one are gone.
    commit(src.store, 2)
    _, new, new_frames = fragment(src, 2)
    at = _committed_at(new.info.manifest) - 1e-6
    assert _committed_at(old.info.manifest) <= at
    holder.on_dropped(pp.Dropped("j", src.me, (2,), at))
    # What is left of the old version's send arrives after the notice: refused.
    with pytest.raises(StoreError) as err:
        holder.on_put_data(old, frames)
    assert err.value.code == "dropped"
    assert not holder._assembling
    # Parity built from the old version (an encode, or a forward, that was under way) is not
    # kept either; the new version's fragment is taken.
    record = ParityRecord("j", 2, stripe.index, 0, old.info.length, (old.info,), bytearray(8),
                          frames_checksum([bytearray(8)]))
    with pytest.raises(StoreError) as err:
        holder._keep(record)
    assert err.value.code == "dropped"
    holder.on_put_data(new, new_frames)
    assert list(holder._assembling) == [("j", 2, stripe.index)]


def test_a_drop_of_another_node_or_step_refuses_nothing(group):
    src = group[0]
    commit(src.store, 2)
    stripe, msg, frames = fragment(src, 2)
    holder = group[stripe.parity[0]]
    other = next(s for s in stripe.data if s != src.me)
    holder.on_dropped(pp.Dropped("j", other, (2,), _committed_at(msg.info.manifest) + 1.0))
    holder.on_dropped(pp.Dropped("j", src.me, (3,), _committed_at(msg.info.manifest) + 1.0))
    holder.on_put_data(msg, frames)
    assert list(holder._assembling) == [("j", 2, stripe.index)]


class _Clock:
    """A wall clock a test steps (as NTP does)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_regression_wall_clock_stepped_back_keeps_protection(tmp_path):
    """Issue 25, finding 3: steps 1-4 committed, the job restored step 2 (steps 3-4 dropped
    and the group told), then node 0's wall clock stepped back 120 s: its new steps 3-4 were
    committed 'before' the drop on that clock, and the holders refused their fragments for
    good ("node 0 dropped this version"). Commits and drops are ordered by the store's
    stamps, which never go back, within a daemon and across a restart on its memory."""
    groups = make_groups(4, 2, 2)
    clock = _Clock(1_800_000_000.0)
    store = Store(str(tmp_path / "n0"), memory_limit=1 << 22, keep=3,
                  identity=lambda pid: 1.0, clock=clock)
    store.open()
    src = Protector(0, group_of(0, groups), make_codec("isal", 2, 2), store, links=None,
                    up=lambda s: True)
    others = {s: protector(tmp_path, groups, s) for s in (1, 2, 3)}
    for step in (1, 2, 3, 4):
        clock.now += 1.0
        commit(store, step)
    stripe, _, _ = fragment(src, 3)
    holder = others[stripe.parity[0]]
    store.drop("j", 0, None, 2)                   # restore(step=2): a new timeline
    at = store.stamp(durable=True)
    holder.on_dropped(pp.Dropped("j", 0, (3, 4), at))
    for back in (120.0, 5.0):
        clock.now -= back                         # the wall clock steps back
        for step in (3, 4):
            commit(store, step)
            _, msg, frames = fragment(src, step)
            holder.on_put_data(msg, frames)       # taken, not refused as dropped
            assert _committed_at(msg.info.manifest) > at
        store.drop("j", 0, None, 2)
        at = store.stamp(durable=True)
        holder.on_dropped(pp.Dropped("j", 0, (3, 4), at))
    # A daemon restarted on this memory with its clock still behind: its stamps stay after
    # the last drop (stamp.json) and after every adopted commit.
    again = Store(str(tmp_path / "n0"), memory_limit=1 << 22, keep=3,
                  identity=lambda pid: 1.0, clock=_Clock(clock.now - 300.0))
    again.open()
    assert again.stamp() > at

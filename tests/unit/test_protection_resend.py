"""A retry asks before it re-sends (HaveData): where nodes save one after another, the first
parity holder already has a node's fragment, waiting for a later node's, and the node's
job-wide-step retry used to send the whole fragment again (bench.cluster: 512 MiB sent per
node for a version whose share is 320 MiB).

Real stores and protectors; the peer messages are handed over in memory."""

import dataclasses

import pytest
from test_protection_drops import commit, fragment, protectors

from snapshotd.cluster import peerproto as pp
from snapshotd.cluster.peers import PeerError
from snapshotd.common import protocol as p
from snapshotd.node.store import StoreError


@pytest.fixture
def group(tmp_path):
    return protectors(tmp_path)


class Wire:
    """Peer calls between protectors in memory, counting the data bytes each one carried."""

    def __init__(self, group, old=()):
        self.group, self.old, self.sent, self.asked = group, set(old), 0, 0

    def call(self, slot, msg, frames=(), timeout=None, while_up=None):
        holder = self.group[slot]
        if isinstance(msg, pp.HaveData):
            if slot in self.old:
                raise PeerError("unknown operation", "unknown_op")
            self.asked += 1
            return p.Ok(int(holder.on_have_data(msg))), []
        if isinstance(msg, pp.PutData):
            self.sent += sum(memoryview(f).nbytes for f in frames)
            holder.on_put_data(msg, [memoryview(f) for f in frames])
            return p.Ok(1), []
        raise AssertionError(f"unexpected {msg}")

    def close_thread(self):
        pass


def test_a_holder_says_whether_it_holds_a_fragment_of_that_very_version(group):
    src = group[0]
    commit(src.store, 2)
    stripe, put, frames = fragment(src, 2)
    holder = group[stripe.parity[0]]
    ask = pp.HaveData("j", 2, stripe.index, put.info)
    assert not holder.on_have_data(ask)                    # nothing yet: send it
    holder.on_put_data(put, frames)                         # waits for the other data node
    assert holder.on_have_data(ask)
    # Its floor is news about the sender: taken from the question as from a fragment.
    newer = pp.HaveData("j", 2, stripe.index, dataclasses.replace(put.info, floor=1))
    assert holder.on_have_data(newer)
    pos = stripe.data.index(src.me)
    assert holder._assembling[("j", 2, stripe.index)].frags[pos][0].floor == 1
    # Another version of the step (a re-commit) is not the fragment held.
    commit(src.store, 2)
    _, again, _ = fragment(src, 2)
    assert not holder.on_have_data(pp.HaveData("j", 2, stripe.index, again.info))
    # Asked of a node that is not the stripe's first parity holder: refused.
    other = next(s for s in range(4) if s not in (stripe.parity[0], src.me))
    with pytest.raises(StoreError) as err:
        group[other].on_have_data(ask)
    assert err.value.code == "bad_request"


def test_a_retry_of_a_version_sent_whole_asks_first_and_sends_only_what_is_missing(group):
    src = group[0]
    wire = Wire(group)
    src.links = wire
    commit(src.store, 2)
    src._send_data_chunks("j", 2)                   # the first send: every fragment's bytes
    first = wire.sent
    assert first > 0 and wire.asked == 0
    src._send_data_chunks("j", 2)                   # the retry: held by every holder
    assert wire.sent == first and wire.asked == src.group.k
    # A holder lost its assembly (restarted, or its stripe expired): only its share goes.
    stripe, put, _ = fragment(src, 2)
    group[stripe.parity[0]]._assembling.clear()
    src._send_data_chunks("j", 2)
    assert wire.sent == first + put.info.length
    # A re-commit of the step is another version: sent whole, not asked about.
    commit(src.store, 2)
    asked = wire.asked
    src._send_data_chunks("j", 2)
    assert wire.asked == asked and wire.sent > first + put.info.length


def test_a_holder_that_predates_the_question_is_sent_the_fragment(group):
    src = group[0]
    commit(src.store, 2)
    stripe, _, _ = fragment(src, 2)
    wire = Wire(group, old={s for s in range(4)})
    src.links = wire
    src._send_data_chunks("j", 2)
    first = wire.sent
    src._send_data_chunks("j", 2)
    assert wire.sent == 2 * first

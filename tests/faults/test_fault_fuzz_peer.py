"""Fuzz the peer protocol of a real daemon over its real TCP port (hypothesis).

The fuzz cluster runs ``--insecure`` so the fuzzer can speak to it at all (what a peer without
the key can do to a CURVE cluster is tested in test_fault_security.py). Random and damaged
frames, wrong stripes/indexes/sources, payloads that do not add up to the declared length or do
not match their checksum, requests for unknown jobs and steps, replays. Every request gets one
answer; errors carry a documented code (never ``internal``) and are counted as
``snapshotd_rejected_requests_total{reason="peer_*"}``; the daemon does not crash or grow, and
the data and parity it holds for the job under test are unchanged and still rebuild a lost node
bit for bit.

Inputs that once hit bugs are part of the mix again now that the bugs are fixed: ``PutParity``
declaring far more bytes than it carries
(test_regression_put_parity_declared_length_allocated_before_check), an ``op`` that is a JSON
list or object (test_regression_unhashable_op_is_internal_error).
"""

import json
import time

import pytest
import zmq
from harness import (
    BASE_SEED,
    LONG,
    RESULTS,
    all_protected,
    metric,
    peer_call,
    proc_stats,
    reproduce,
    restore_all,
    save_on,
    status,
    wait_for,
)
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from snapshotd.cluster import peerproto as pp
from snapshotd.cluster.protection import frames_checksum
from snapshotd.common import protocol as p

pytest_plugins = ["faultfixtures"]

pytestmark = pytest.mark.timeout(1800 if LONG else 150)

KEEP = "keep"
CODES = {"malformed", "bad_version", "unknown_op", "too_large", "bad_request", "not_found",
         "corrupt", "memory_full", "peer_down", "checksum_mismatch"}
EXAMPLES = 2000 if LONG else 100
STATS = {"sent": 0, "answered": 0, "errors": 0, "slowest": 0.0}
ROW = "fuzz: peer protocol (hypothesis)"
NODES, K, M = 4, 2, 2


@pytest.fixture(scope="module")
def target(clusters, zygote):
    cluster = clusters(NODES, k=K, m=M,
                       args=["--insecure", "--memory-limit", "256MiB", "--heartbeat-interval",
                             "0.2", "--peer-timeout", "1.5", "--encode-timeout", "2"])
    cluster.start()
    save_on(zygote, cluster, KEEP, 1, 2, 1)
    wait_for(lambda: all_protected(cluster, KEEP, 2), 20, "step 2 protected")
    spec = cluster.specs[0]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(spec.listen)
    time.sleep(0.3)
    inv, _ = peer_call(spec, pp.Inventory(0))
    env = {"cluster": cluster, "spec": spec, "sock": sock, "pid": cluster.daemons[0].pid,
           "before": proc_stats(cluster.daemons[0].pid), "inventory": inv, "zygote": zygote,
           "rejected": metric(spec, "snapshotd_rejected_requests_total"),
           "versions": [(v.job, v.rank, v.step, v.state) for v in status(spec).versions]}
    yield env
    sock.close(0)
    ctx.term()


small = st.integers(-2, 8)
anyint = st.one_of(small, st.sampled_from([1 << 31, 1 << 62, -(1 << 40), 10 ** 20]),
                   st.integers())
jobs = st.one_of(st.sampled_from(["scratch", "", "x" * 300]), st.text(max_size=8)).filter(
    lambda j: j != KEEP)
read_jobs = st.one_of(jobs, st.just(KEEP))
payloads = st.lists(st.binary(max_size=256), max_size=3)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), anyint, st.text(max_size=6)),
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=4), c,
                                                                  max_size=3)),
    max_leaves=5)


@st.composite
def frag_infos(draw):
    return pp.FragInfo(draw(small), draw(small), draw(st.integers(0, 4096)),
                       draw(st.one_of(st.text(max_size=10), st.just('{"ranks": []}'))))


@st.composite
def requests(draw):
    """(message, payload frames): mostly near-valid, with honest or dishonest sizes/sums."""
    kind = draw(st.sampled_from(["ping", "put_data", "put_parity", "protected", "dropped",
                                 "inventory", "get_data", "get_parity", "reply"]))
    body = draw(payloads)
    honest = draw(st.booleans())
    checksum = frames_checksum(body) if honest else draw(st.text(max_size=16))
    length = sum(len(b) for b in body) if honest else draw(
        st.one_of(st.integers(0, 4096), st.just(1 << 30), st.just(1 << 40)))
    if kind == "ping":
        return pp.Ping(draw(anyint), draw(st.text(max_size=8))), []
    if kind == "put_data":
        info = draw(frag_infos())
        info = pp.FragInfo(info.src, info.frag, length, info.manifest)
        return pp.PutData(draw(jobs), draw(anyint), draw(small), info, checksum), body
    if kind == "put_parity":
        return pp.PutParity(draw(jobs), draw(anyint), draw(small), draw(small), length,
                            tuple(draw(st.lists(frag_infos(), max_size=2))), checksum), body
    if kind == "protected":
        return pp.Protected(draw(jobs), draw(anyint), draw(small)), []
    if kind == "dropped":
        return pp.Dropped(draw(jobs), draw(anyint), tuple(draw(st.lists(anyint, max_size=3)))), []
    if kind == "inventory":
        return pp.Inventory(draw(anyint)), []
    if kind == "get_data":
        return pp.GetData(draw(read_jobs), draw(st.one_of(small, anyint)), draw(anyint)), []
    if kind == "get_parity":
        return pp.GetParity(draw(read_jobs), draw(st.one_of(small, anyint)), draw(small),
                            draw(small)), []
    return draw(st.sampled_from([p.Ok(1), pp.Pong(1, True), p.Error("x", "y")])), []


@st.composite
def frames(draw):
    if draw(st.integers(0, 5)) == 0:
        return draw(st.lists(st.binary(max_size=200), min_size=1, max_size=4))
    msg, body = draw(requests())
    head = json.loads(p.encode(msg, draw(st.integers(0, 1 << 31))))
    how = draw(st.sampled_from(["none", "none", "none", "version", "op", "drop_key",
                                "add_key", "retype", "op_type", "truncate", "flip"]))
    if how == "version":
        head["v"] = draw(st.one_of(st.none(), anyint, st.text(max_size=3)))
    elif how == "op":
        head["op"] = draw(st.one_of(st.sampled_from(["alloc", "pong", "chunk", ""]),
                                    st.text(max_size=8)))
    elif how == "drop_key":
        head.pop(draw(st.sampled_from(sorted(head))), None)
    elif how == "add_key":
        head[draw(st.text(max_size=5))] = draw(json_values)
    elif how == "retype":
        head[draw(st.sampled_from(sorted(head)))] = draw(json_values)
    elif how == "op_type":
        head["op"] = draw(st.one_of(st.lists(st.text(max_size=3), max_size=2),
                                    st.dictionaries(st.text(max_size=3), st.integers(),
                                                    max_size=2)))
    frame = json.dumps(head).encode()
    if how == "truncate":
        frame = frame[:draw(st.integers(0, len(frame) - 1))]
    elif how == "flip":
        i = draw(st.integers(0, len(frame) - 1))
        frame = frame[:i] + bytes([frame[i] ^ (1 << draw(st.integers(0, 7)))]) + frame[i + 1:]
    return [frame, *body]


def exchange(sock, parts, timeout=10.0):
    started = time.monotonic()
    sock.send_multipart(parts)
    assert sock.poll(int(timeout * 1000)), f"no answer in {timeout}s to {parts!r}"[:500]
    reply = sock.recv_multipart()
    return pp.decode(reply[0])[1], time.monotonic() - started


def test_fuzz_peer_protocol(target, request):
    @seed(BASE_SEED)
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(frames(), min_size=1, max_size=6))
    def fuzz(batch):
        for parts in batch:
            STATS["sent"] += 1
            msg, took = exchange(target["sock"], parts)
            STATS["slowest"] = max(STATS["slowest"], took)
            if isinstance(msg, p.Error):
                assert msg.code in CODES, f"{msg} for {parts!r}"[:800]
                STATS["errors"] += 1
            STATS["answered"] += 1
        assert target["cluster"].daemons[0].alive(), "the daemon died"

    try:
        fuzz()
    finally:
        RESULTS.tally(ROW, "random and damaged peer frames (insecure cluster): wrong stripes, "
                      "sources, lengths, checksums, jobs, steps; one run = one request",
                      reproduce(request.node.nodeid), runs=STATS["sent"],
                      survived=STATS["answered"], stall=STATS["slowest"], seed=BASE_SEED,
                      figures={"errors": STATS["errors"]})


def test_replayed_peer_messages_change_nothing(target):
    """A valid data fragment sent twice, a Protected for a stripe twice, the same Inventory and
    GetData again: answered, idempotent, nothing of the job under test changes."""
    sock = target["sock"]
    body = [b"replayed fragment"]
    info = pp.FragInfo(2, 0, len(body[0]), "{}")
    # Node 0 is the first parity holder of stripe 0 (data from nodes 2 and 3).
    put = [p.encode(pp.PutData("replay", 1, 0, info, frames_checksum(body)), 5), *body]
    for _ in range(3):
        msg, _ = exchange(sock, put)
        assert isinstance(msg, p.Ok), msg
    for _ in range(2):
        msg, _ = exchange(sock, [p.encode(pp.Protected("replay", 1, 0), 6)])
        assert isinstance(msg, p.Ok), msg
    first, _ = exchange(sock, [p.encode(pp.GetData(KEEP, 2, 0), 7)])
    again, _ = exchange(sock, [p.encode(pp.GetData(KEEP, 2, 0), 7)])
    assert first == again


def test_after_peer_fuzzing_nothing_changed(target, request):
    cluster, spec = target["cluster"], target["spec"]
    problems = []
    time.sleep(2.5)                           # fuzzed half-assembled stripes expire (2 s)
    after = proc_stats(target["pid"])
    grew = after["rss"] - target["before"]["rss"]
    if grew > (48 << 20):
        problems.append(f"daemon RSS grew by {grew >> 20} MiB")
    if after["fds"] > target["before"]["fds"] + 8:
        problems.append(f"daemon fds {target['before']['fds']} -> {after['fds']}")
    versions = [(v.job, v.rank, v.step, v.state) for v in status(spec).versions]
    if versions != target["versions"]:
        problems.append(f"versions changed: {target['versions']} -> {versions}")
    inv, _ = peer_call(spec, pp.Inventory(0))
    keep = lambda i: sorted((h.stripe, h.step, h.index, h.length)  # noqa: E731
                            for h in i.parity if h.job == KEEP)
    if keep(inv) != keep(target["inventory"]):
        problems.append("the parity held for the job under test changed")
    rejected = metric(spec, "snapshotd_rejected_requests_total") - target["rejected"]
    if STATS["errors"] and rejected < STATS["errors"]:
        problems.append(f"{STATS['errors']} errors answered, {rejected:.0f} counted")
    # The parity on the fuzzed node still rebuilds a lost node bit for bit.
    cluster.kill(2)
    cluster.replace(2)
    lost, _, probs, _ = restore_all(target["zygote"], cluster, KEEP, 1, {(2, 2): 2})
    problems += probs
    RESULTS.tally(ROW, "", reproduce(request.node.nodeid), runs=0, survived=0, lost=lost,
                  figures={"rss_growth_mib": round(grew / (1 << 20), 1),
                           "fd_growth": after["fds"] - target["before"]["fds"]},
                  failure="; ".join(problems))
    assert not problems, f"{problems} (seed {BASE_SEED}; {reproduce(request.node.nodeid)})"

"""Fuzz the local control protocol of a real daemon over its real ipc socket (hypothesis).

Random frames, truncated and bit-flipped frames, wrong versions, unknown ops, wrongly typed and
out-of-range fields, huge declared sizes, wrong job/rank/step, replayed messages. Every request
gets exactly one answer, an error with a documented code (never ``internal``) unless it was a
valid request; the daemon counts the errors in ``snapshotd_rejected_requests_total``, never
crashes, does not grow, leaks no descriptors, slots or leases, and the stored data is unchanged
and still restores bit for bit through a real trainer.

Inputs that once hit bugs are part of the mix again now that the bugs are fixed: ``Open`` with
a negative or non-running pid (test_regression_open_with_negative_pid_pins_version,
test_regression_lease_of_dead_pid_never_reaped), an ``op`` that is a JSON list or object
(test_regression_unhashable_op_is_internal_error).
"""

import json
import subprocess
import time

import pytest
import zmq
from harness import (
    BASE_SEED,
    LONG,
    RESULTS,
    call,
    metric,
    proc_stats,
    reproduce,
    restore_check,
    shm_files,
    status,
    wait_for,
)
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from snapshotd.common import protocol as p

pytest_plugins = ["faultfixtures"]

pytestmark = pytest.mark.timeout(1800 if LONG else 120)

KEEP = "keep"                      # the job whose data must not change
CODES = {"malformed", "bad_version", "unknown_op", "too_large", "bad_request", "bad_table",
         "memory_full", "unknown_slot", "unknown_lease", "not_found", "checksum_mismatch",
         "cannot_rebuild", "shutting_down", "rebuilding", "forbidden", "corrupt",
         "disk_full", "disk_error"}
EXAMPLES = 2500 if LONG else 120
STATS = {"sent": 0, "answered": 0, "errors": 0, "slowest": 0.0, "codes": {}}
ROW = "fuzz: control protocol (hypothesis)"


@pytest.fixture(scope="module")
def target(clusters, zygote):
    cluster = clusters(1, args=["--memory-limit", "96MiB", "--reap-interval", "0.2"])
    cluster.start()
    spec = cluster.specs[0]
    assert zygote.run("save", spec.control, "--job", KEEP, "--steps", 1, 2, "--mib", 2)["done"]
    sleeper = subprocess.Popen(["sleep", "3600"])       # a live "writer" for fuzzed requests
    dead = subprocess.Popen(["true"])
    dead.wait()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(spec.control)
    pid = cluster.daemons[0].pid
    time.sleep(0.3)
    env = {"cluster": cluster, "spec": spec, "sock": sock, "sleeper": sleeper.pid,
           "dead": dead.pid, "before": proc_stats(pid), "pid": pid,
           "versions": [(v.job, v.rank, v.step, v.nbytes, v.committed_at)
                        for v in status(spec).versions],
           "rejected": metric(spec, "snapshotd_rejected_requests_total"), "zygote": zygote,
           "sleeper_proc": sleeper}
    yield env
    sleeper.kill()
    sock.close(0)
    ctx.term()


# --------------------------------------------------------------------------- strategies

small = st.integers(-3, 40)
big = st.sampled_from([-1, 0, 1 << 31, 1 << 40, (1 << 63) - 1, 1 << 64, 10 ** 30, -(1 << 63)])
anyint = st.one_of(small, big, st.integers())
jobs = st.one_of(st.sampled_from(["scratch", "other", "", "../x", "a" * 200, "job b", "ké"]),
                 st.text(max_size=12)).filter(lambda j: j != KEEP)
read_jobs = st.one_of(jobs, st.just(KEEP))
opt = lambda s: st.one_of(st.none(), s)  # noqa: E731
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), anyint, st.floats(allow_nan=False), st.text(max_size=8)),
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=5), c,
                                                                  max_size=3)),
    max_leaves=6)


@st.composite
def entries(draw):
    return p.TensorEntry(draw(st.text(max_size=6)),
                         draw(st.sampled_from(["float32", "int64", "bogus", "bool", ""])),
                         tuple(draw(st.lists(small, max_size=3))), draw(anyint), draw(anyint),
                         draw(st.text(max_size=4)))


@st.composite
def messages(draw, env):
    pids = st.sampled_from([env["sleeper"], env["dead"], -1, 0, 1 << 40])
    kind = draw(st.sampled_from(["alloc", "commit", "abort", "release", "list", "open", "drop",
                                 "verify", "status", "persist"]))
    if kind == "alloc":
        return p.Alloc(draw(jobs), draw(anyint), draw(anyint), draw(anyint), draw(pids),
                       draw(anyint))
    if kind == "commit":
        return p.Commit(draw(st.one_of(small, anyint)), tuple(draw(st.lists(entries(),
                                                                            max_size=3))),
                        draw(st.one_of(st.text(max_size=10), st.just("{}"))))
    if kind == "abort":
        return p.Abort(draw(anyint))
    if kind == "release":
        return p.Release(draw(anyint))
    if kind == "list":
        return p.ListVersions(draw(read_jobs), draw(opt(anyint)))
    if kind == "open":
        return p.Open(draw(read_jobs), draw(anyint), draw(pids), draw(opt(anyint)),
                      draw(opt(anyint)), draw(st.booleans()))
    if kind == "drop":
        return p.Drop(draw(jobs), draw(opt(anyint)), draw(opt(anyint)), draw(opt(anyint)))
    if kind == "verify":
        return p.Verify(draw(read_jobs), draw(opt(anyint)), draw(opt(anyint)))
    if kind == "persist":
        return p.Persist(draw(jobs), draw(opt(anyint)))
    return p.Status()


@st.composite
def mutated(draw, env):
    """A real message's frame, then maybe damaged: the fields, the JSON or the bytes."""
    msg = draw(messages(env))
    body = json.loads(p.encode(msg, draw(st.integers(0, 1 << 31))))
    how = draw(st.sampled_from(["none", "none", "version", "op", "drop_key", "add_key",
                                "retype", "id", "op_type", "truncate", "flip", "wrap"]))
    if how == "version":
        body["v"] = draw(st.one_of(st.just(None), anyint, st.text(max_size=3)))
    elif how == "op":
        body["op"] = draw(st.one_of(st.sampled_from(["ok", "error", "alloc_reply", "ALLOC",
                                                     "", "status_reply"]), st.text(max_size=8)))
    elif how == "drop_key":
        body.pop(draw(st.sampled_from(sorted(body))), None)
    elif how == "add_key":
        body[draw(st.text(max_size=6))] = draw(json_values)
    elif how == "retype":
        body[draw(st.sampled_from(sorted(body)))] = draw(json_values)
    elif how == "id":
        body["id"] = draw(json_values)
    elif how == "op_type":
        body["op"] = draw(st.one_of(st.lists(st.text(max_size=3), max_size=2),
                                    st.dictionaries(st.text(max_size=3), st.integers(),
                                                    max_size=2)))
    frame = json.dumps(body).encode()
    if how == "truncate":
        frame = frame[:draw(st.integers(0, max(0, len(frame) - 1)))]
    elif how == "flip":
        i = draw(st.integers(0, len(frame) - 1))
        frame = frame[:i] + bytes([frame[i] ^ (1 << draw(st.integers(0, 7)))]) + frame[i + 1:]
    elif how == "wrap":
        frame = json.dumps([body]).encode()
    return [frame]


def frames(env):
    raw = st.lists(st.binary(max_size=300), min_size=1, max_size=3)
    extra = st.tuples(mutated(env), st.lists(st.binary(max_size=20), min_size=1, max_size=2))
    return st.one_of(mutated(env), mutated(env), raw,
                     extra.map(lambda t: t[0] + t[1]))             # control has no payload


def exchange(sock, parts, timeout=10.0):
    """Send one request; return (reply, seconds)."""
    started = time.monotonic()
    sock.send_multipart(parts)
    assert sock.poll(int(timeout * 1000)), f"no answer in {timeout}s to {parts!r}"[:500]
    reply = sock.recv_multipart()
    took = time.monotonic() - started
    assert len(reply) == 1, f"reply of {len(reply)} frames to {parts!r}"
    _, msg = p.decode(reply[0])
    return msg, took


def cleanup(env, msg):
    """Give back what a (rarely) valid fuzzed request took, so the budget stays free."""
    sock = env["sock"]
    if isinstance(msg, p.AllocReply):
        exchange(sock, [p.encode(p.Abort(msg.slot))])
    elif isinstance(msg, p.OpenReply):
        exchange(sock, [p.encode(p.Release(msg.lease))])


# --------------------------------------------------------------------------- the tests


def test_fuzz_control_protocol(target, request):
    @seed(BASE_SEED)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(frames(target), min_size=1, max_size=6))
    def fuzz(batch):
        for parts in batch:
            STATS["sent"] += 1
            msg, took = exchange(target["sock"], parts)
            STATS["slowest"] = max(STATS["slowest"], took)
            if isinstance(msg, p.Error):
                assert msg.code in CODES, f"{msg} for {parts!r}"[:800]
                STATS["errors"] += 1
                STATS["codes"][msg.code] = STATS["codes"].get(msg.code, 0) + 1
            else:
                cleanup(target, msg)
            STATS["answered"] += 1
            assert target["cluster"].daemons[0].alive(), "the daemon died"

    try:
        fuzz()
    finally:
        RESULTS.tally(ROW, "random, truncated, bit-flipped and mistyped control frames, wrong "
                      "versions/ops/jobs/ranks/steps, huge sizes; one run = one request",
                      reproduce(request.node.nodeid), runs=STATS["sent"],
                      survived=STATS["answered"], stall=STATS["slowest"], seed=BASE_SEED,
                      figures={"errors": STATS["errors"]})


def test_replayed_control_messages_are_refused(target):
    """A real save's Commit, Abort and Release frames replayed: refused, nothing changes."""
    sock, sleeper = target["sock"], target["sleeper"]
    frames_seen = []

    def send(msg):
        frame = p.encode(msg, 7)
        frames_seen.append(frame)
        reply, _ = exchange(sock, [frame])
        return reply

    slot = send(p.Alloc("replay", 0, 1, 256, sleeper))
    send(p.Commit(slot.slot, (p.TensorEntry("w", "float32", (64,), 0, 256),), "{}"))
    lease = send(p.Open("replay", 0, sleeper))
    send(p.Release(lease.lease))
    other = send(p.Alloc("replay", 0, 2, 256, sleeper))
    send(p.Abort(other.slot))
    codes = []
    for frame in frames_seen[1:2] + frames_seen[3:4] + frames_seen[5:]:
        reply, _ = exchange(sock, [frame])
        codes.append(reply.code)
    assert codes == ["unknown_slot", "unknown_lease", "unknown_slot"]
    assert [v.step for v in status(target["spec"]).versions if v.job == "replay"] == [1]
    exchange(sock, [p.encode(p.Drop("replay"))])


def test_oversized_frame_is_dropped_and_daemon_serves(target):
    """A frame over MAX_MESSAGE_BYTES: the connection is dropped (ZeroMQ MAXMSGSIZE), the
    daemon does not read it into memory and serves the next client."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(target["spec"].control)
    try:
        sock.send(b"{" + b" " * (p.MAX_MESSAGE_BYTES + 16))
        assert not sock.poll(1500), "an oversized frame got an answer"
    finally:
        sock.close(0)
        ctx.term()
    assert status(target["spec"]).accepting


def test_after_fuzzing_nothing_changed_and_nothing_leaked(target, request):
    spec, pid = target["spec"], target["pid"]
    problems = []
    target["sleeper_proc"].kill()                # its slots and leases must now be reclaimed
    target["sleeper_proc"].wait()
    wait_for(lambda: status(spec).open_slots == 0 and status(spec).open_leases == 0, 10,
             "fuzzed slots and leases reclaimed")
    after = proc_stats(pid)
    grew = after["rss"] - target["before"]["rss"]
    if grew > (48 << 20):
        problems.append(f"daemon RSS grew by {grew >> 20} MiB")
    if after["fds"] > target["before"]["fds"] + 8:
        problems.append(f"daemon fds {target['before']['fds']} -> {after['fds']}")
    versions = [(v.job, v.rank, v.step, v.nbytes, v.committed_at)
                for v in status(spec).versions if v.job == KEEP]
    if versions != [v for v in target["versions"] if v[0] == KEEP]:
        problems.append(f"stored versions changed: {target['versions']} -> {versions}")
    bad = [r for r in call(spec, p.Verify(KEEP)).results if r.bad]
    if bad:
        problems.append(f"verify: {bad}")
    manifests = shm_files(spec, ".json")
    if len(manifests) != len(status(spec).versions):
        problems.append(f"{len(manifests)} manifests for {len(status(spec).versions)} versions")
    rejected = metric(spec, "snapshotd_rejected_requests_total") - target["rejected"]
    if STATS["errors"] and rejected < STATS["errors"]:
        problems.append(f"{STATS['errors']} errors answered, {rejected:.0f} counted as rejected")
    for step in (2, 1):     # newest first: restoring 1 starts a new timeline (drops 2)
        ok, out = restore_check(target["zygote"], spec, KEEP, 0, 2, step, step=step)
        if not ok:
            problems.append(f"restore of step {step}: {out}")
    RESULTS.tally(ROW, "", reproduce(request.node.nodeid), runs=0, survived=0,
                  lost=0 if not problems else 1,
                  figures={"rss_growth_mib": round(grew / (1 << 20), 1),
                           "fd_growth": after["fds"] - target["before"]["fds"]},
                  failure="; ".join(problems))
    assert not problems, f"{problems} (seed {BASE_SEED}; {reproduce(request.node.nodeid)})"

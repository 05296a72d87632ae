"""Regression tests for the client bugs of the independent review (issue "Client correctness"),
one per bug, named after it, each against a real daemon.

Each failed before its fix (checked against the client as it was); the review's reproductions
they are built from are named in the docstrings.
"""

import os
import threading
import time
import uuid
from datetime import timedelta

import numpy as np
import pytest
import torch

from conftest import status
from snapshotd_client import SnapshotClient, SnapshotError, SnapshotSkipped, TrainingState
from snapshotd_client import _protocol as p
from snapshotd_client._channel import Channel, DaemonError

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def keep3(cluster_factory):
    """One real daemon keeping three versions per rank."""
    cluster = cluster_factory(1, args=["--memory-limit", "2GiB", "--reap-interval", "0.2",
                                       "--keep", "3"])
    cluster.start()
    return cluster.specs[0]


def client(spec, **kw):
    return SnapshotClient(spec.control, job="j" + uuid.uuid4().hex[:8], rank=0, **kw)


def bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.BatchNorm1d(256),
                               torch.nn.Linear(256, 256))


# --------------------------------------------------------------------- snapshots == state


def test_regression_forward_mutated_buffers_torn(keep3):
    """t7_bn: the next forward changed BatchNorm's running statistics while the previous
    step's copy ran; 6-7 of 10 snapshots differed from the state at save()."""
    model = bn_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with client(keep3) as c:
        state = TrainingState(model, opt, rng=False)
        for step in range(10):
            model(torch.randn(32, 256)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            expected = {k: v.clone() for k, v in model.state_dict().items()}
            state.save(c, step)
            model(torch.randn(32, 256)).pow(2).mean().backward()   # changes the buffers
            c.wait()
            _, snap = c.restore(step=step)
            diff = [k for k in expected if not torch.equal(expected[k], snap["model"][k])]
            assert diff == [], f"step {step}: {diff} differ from the state at save()"
        assert c.stats().committed == 10 and c.stats().eager_bytes > 0


def test_regression_restore_during_copy_rewrites_save(keep3):
    """t22_rollback: restore(step=5) into the model while step 8 was still being copied wrote
    step 5's values into step 8's snapshot."""
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)])  # 128 MiB
    state = TrainingState(model, rng=False)
    with client(keep3) as c:
        with torch.no_grad():
            for prm in model.parameters():
                prm.fill_(5.0)
        state.save(c, 5).result()
        with torch.no_grad():
            for prm in model.parameters():
                prm.fill_(8.0)
        state.save(c, 6).result()                     # warms the segment and mapping caches
        future = state.save(c, 8)
        assert state.restore(c, step=5) == 5
        # The restore waited for step 8: it was committed whole before anything was written.
        assert future.done() and future.result() == 8
        assert all(torch.equal(prm, torch.full_like(prm, 5.0)) for prm in model.parameters())


def test_regression_concurrent_saves_wait_copied_returns_early(keep3):
    """t14_threads: save() from two threads let wait_copied() return while a copy was
    still pending (18/200)."""
    import sys

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with client(keep3) as c:
            jobs = []
            submit = c._worker.submit

            def spy(fn, job):
                jobs.append(job)
                return submit(fn, job)

            c._worker.submit = spy
            a, b = torch.zeros(8 << 20), torch.zeros(8 << 20)
            hits = 0
            for it in range(200):
                jobs.clear()
                barrier = threading.Barrier(2)

                def go(t, s, barrier=barrier):
                    barrier.wait()
                    c.save(s, {"t": t})

                threads = [threading.Thread(target=go, args=(a, 2 * it)),
                           threading.Thread(target=go, args=(b, 2 * it + 1))]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                c.wait_copied()
                hits += any(not j.copied.is_set() for j in jobs)
                c.wait()
            assert hits == 0
    finally:
        sys.setswitchinterval(interval)


def test_regression_colliding_names_restore_wrong_tensor(keep3):
    """t16_ties: {"x/y": a, "x": {"y": b}} restored b's bytes into a with restore(into=)."""
    with client(keep3) as c:
        a, b = torch.zeros(2), torch.ones(2)
        c.save(1, {"x/y": a, "x": {"y": b}, 0: torch.full((2,), 3.0),
                   "0": torch.full((2,), 4.0)}).result()
        into_b, into_a = torch.full((2,), 7.0), torch.full((2,), 7.0)
        _, back = c.restore(into={"x": {"y": into_b}, "x/y": into_a})
        assert torch.equal(into_b, b) and torch.equal(into_a, a)
        assert back["x"]["y"].data_ptr() == into_b.data_ptr()
        assert back["x/y"].data_ptr() == into_a.data_ptr()
        assert torch.equal(back[0], torch.full((2,), 3.0))
        assert torch.equal(back["0"], torch.full((2,), 4.0))


def test_regression_tied_weights_stored_twice_and_untied(keep3):
    """t16_ties: tied embedding/head weights were stored twice and came back untied."""
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    sd = torch.nn.ModuleDict({"emb": emb, "head": head}).state_dict()
    with client(keep3) as c:
        c.save(1, {"model": sd}).result()
        held = Channel(keep3.control).call(p.ListVersions(c.job, 0)).versions[0]
        assert held.nbytes == 192                     # one 10x4 float32 tensor, aligned
        _, back = c.restore()
        assert back["model"]["emb.weight"] is back["model"]["head.weight"]
        assert torch.equal(back["model"]["emb.weight"], emb.weight)


@pytest.mark.parametrize("mode", ["eager", "auto"])
def test_regression_in_place_change_after_save_torn_silently(keep3, mode):
    """t17_torn: an in-place change right after save() (no protect) was silently part of the
    snapshot. copy='eager' (strict) and copy='auto' without protect copy at save()."""
    with client(keep3, copy=mode) as c:
        t = torch.zeros(8 << 20)
        future = c.save(1, {"t": t})
        t.fill_(1.0)                                  # at once, while the copy may run
        assert future.result() == 1
        _, back = c.restore()
        assert torch.count_nonzero(back["t"]) == 0


def test_tensors_copied_at_save_go_straight_into_the_slot_the_last_commit_reserved(keep3):
    """Without protect() every tensor is copied at save(): once the previous save is done,
    into the spare slot its commit reserved (memory the daemon faulted in already), not into
    clones; the snapshot is still the state at save() though the tensor changes as soon as
    save() returns, and that save sends no Alloc."""
    t = torch.arange(1 << 20, dtype=torch.float32)
    with client(keep3) as c:
        ops = []
        call = c._channel.call
        c._channel.call = lambda msg, timeout=None: ops.append(msg.OP) or call(msg, timeout)
        for step in range(6):
            t.fill_(step)
            future = c.save(step, {"t": t, "step": step})
            t.fill_(-1.0)                      # changed right after save() returns
            assert future.result(30) == step
            if step >= 2:                      # a spare from the second commit on
                assert c._current.written == frozenset({0}), step
        assert ops.count("alloc") == 2, ops
        for step in (5, 4, 3):                 # (restoring one drops the newer ones)
            got = c.restore(step=step, zero_copy=False)
            assert got is not None and got[1]["step"] == step
            assert torch.equal(got[1]["t"], torch.full_like(t, step)), step
        assert c.stats().eager_bytes == 6 * t.numel() * 4 and c.stats().failed == 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("env", [None, "any"])
def test_the_copy_thread_moves_to_the_cpus_the_daemon_is_pinned_to(keep3, monkeypatch, env):
    """A daemon pinned to some CPUs (the cores left to snapshotd) gets the client's copy
    thread there, off the trainer's core; SNAPSHOTD_COPY_CPUS=any leaves it alone."""
    if env is None:
        monkeypatch.delenv("SNAPSHOTD_COPY_CPUS", raising=False)
    else:
        monkeypatch.setenv("SNAPSHOTD_COPY_CPUS", env)
    daemon_cpu = max(os.sched_getaffinity(0))
    pid = status(keep3).pid
    for tid in os.listdir(f"/proc/{pid}/task"):          # affinity is per thread
        os.sched_setaffinity(int(tid), {daemon_cpu})
    with client(keep3) as c:
        c.save(1, {"t": torch.ones(1024)}).result(30)
        (worker,) = c._worker._threads
        got = os.sched_getaffinity(worker.native_id)
    assert got == ({daemon_cpu} if env is None else os.sched_getaffinity(0)), got


def test_client_copy_mode_is_validated(keep3):
    with pytest.raises(ValueError, match="copy='sometimes'"):
        SnapshotClient(keep3.control, job="x", rank=0, copy="sometimes")


# --------------------------------------------------------------------- steps and timelines


def test_regression_rollback_resumes_abandoned_timeline(keep3):
    """t5_steps: held 5,6,7 -> restore(step=5) -> save(6) -> crash -> restore() returned the
    abandoned step 7. Restoring a step starts a new timeline, with or without distributed."""
    job = "j" + uuid.uuid4().hex[:8]
    w = torch.zeros(4)
    with SnapshotClient(keep3.control, job=job, rank=0) as c:
        for s in (5, 6, 7):
            w.fill_(s)
            c.save(s, {"w": w}).result()
        step, st = c.restore(step=5)
        assert step == 5 and c.steps() == [5]
        w.copy_(st["w"])
        w.fill_(600)
        assert c.save(6, {"w": w}).result() == 6
    with SnapshotClient(keep3.control, job=job, rank=0) as c:   # the trainer crashed
        step, st = c.restore()
        assert step == 6 and torch.equal(st["w"], torch.full((4,), 600.0))
        assert c.steps() == [5, 6]


def test_regression_lower_step_save_reports_success(keep3):
    """t5_steps: with 10, 11, 12 held, save(5) reported success and kept nothing. It is
    refused (stale_step) before any copy, loudly, and what is held is unchanged."""
    with client(keep3) as c:
        for s in (10, 11, 12):
            c.save(s, {"w": torch.ones(1)}).result()
        future = c.save(5, {"w": torch.ones(1)})
        with pytest.raises(DaemonError) as err:
            future.result()
        assert err.value.code == "stale_step" and "restore" in err.value.message
        assert c.steps() == [10, 11, 12]
        assert c.stats().failed == 1 and c.last_error() is err.value


@pytest.mark.parametrize("bad", [25.0, True, "3", -1])
def test_regression_float_step_stalls_optimizer_step(keep3, bad):
    """t20_floatstep: a float or bool step stalled the next optimizer.step() for the whole
    timeout (the daemon's error reply carried id 0 and the client ignored it)."""
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with client(keep3, timeout=timedelta(seconds=20)) as c:
        c.protect(opt)
        started = time.monotonic()
        future = c.save(bad, {"model": model.state_dict()})
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        assert time.monotonic() - started < 2.0
        with pytest.raises(SnapshotError, match="integer in"):
            future.result()
        assert c.save(np.int64(3), {"model": model.state_dict()}).result() == 3


def test_regression_error_reply_without_request_id_ignored(keep3):
    """The daemon answers a request it cannot read with an error of id 0; the channel takes it
    as the answer instead of waiting for the timeout."""
    ch = Channel(keep3.control, timedelta(seconds=20))
    try:
        started = time.monotonic()
        with pytest.raises(DaemonError):
            ch.call(p.Alloc("job", 0, 1.5, 0, 1))     # type: ignore[arg-type]
        assert time.monotonic() - started < 2.0
    finally:
        ch.close()


def test_regression_back_to_back_saves_lose_final_save(keep3):
    """t15_skip: 99 of 100 back-to-back saves were skipped, the last one among them. The
    newest save always goes ahead; skipped ones are counted."""
    with client(keep3) as c:
        w = torch.zeros(1000)
        futures = [c.save(s, {"w": w}) for s in range(100)]
        c.close()
        skipped = [s for s, f in enumerate(futures) if isinstance(f.exception(), SnapshotSkipped)]
        done = [s for s, f in enumerate(futures) if f.exception() is None]
        assert 99 in done and 99 not in skipped
        assert len(skipped) + len(done) == 100
        stats = c.stats()
        assert (stats.saves, stats.committed, stats.skipped) == (100, len(done), len(skipped))
    with SnapshotClient(keep3.control, job=c.job, rank=0) as again:
        assert again.latest() == 99


# --------------------------------------------------------------------- values


def test_regression_numpy_values_break_snapshot(keep3):
    """t4_np: a np.float64 NaN made the snapshot unrestorable, a 0-d array came back (1,),
    and a big-endian array / np.longdouble raised into the training step."""
    state = {"nan": np.float64("nan"), "inf": np.float32("-inf"), "zero_d": np.array(2.0),
             "be": np.arange(6, dtype=">f8").reshape(2, 3), "c": np.complex64(1 + 2j)}
    with client(keep3) as c:
        assert c.save(1, state).result() == 1
        _, back = c.restore()
        assert np.isnan(back["nan"]) and type(back["nan"]) is np.float64
        assert back["inf"] == -np.inf and type(back["inf"]) is np.float32
        assert back["zero_d"].shape == () and back["zero_d"] == 2.0
        assert back["be"].dtype == np.dtype(">f8") and (back["be"] == state["be"]).all()
        assert back["c"] == state["c"] and type(back["c"]) is np.complex64
        for value in (np.longdouble(1.5), np.array(["a"], dtype=object)):
            future = c.save(2, {"v": value})          # must not raise
            with pytest.raises(SnapshotError, match="/v"):
                future.result()
        assert c.stats().failed == 2 and c.steps() == [1]


def test_regression_new_dtypes_refused_after_full_copy(keep3):
    """t2_dtypes: float8_e8m0fnu and float4_e2m1fn_x2 were refused at commit, after the copy.
    Every dtype torch can copy round-trips; the others are refused before any memory."""
    with client(keep3) as c:
        for step, dtype in enumerate([torch.float8_e8m0fnu, torch.float4_e2m1fn_x2,
                                      torch.bits16, torch.uint64, torch.complex32]):
            size = torch.empty(0, dtype=dtype).element_size()
            t = torch.randint(0, 256, (37 * size,), dtype=torch.uint8).view(dtype)
            c.save(step, {"t": t}).result()
            _, back = c.restore()
            assert back["t"].dtype == dtype
            assert torch.equal(back["t"].view(torch.uint8), t.view(torch.uint8))
        before = status(keep3)              # open_slots: the spare reserved for the next save
        future = c.save(9, {"t": torch.empty(4, dtype=torch.uint8).view(torch.uint4)})
        with pytest.raises(SnapshotError, match="torch.uint4"):
            future.result()
        assert status(keep3).bytes_used == before.bytes_used
        assert status(keep3).open_slots == before.open_slots <= 1


def test_regression_large_non_tensor_state_breaks_restore(keep3):
    """t11_big / t12_huge: a skeleton just under the frame limit was committed but could not be
    restored (ProtocolError, lease held); a 10-million-element list reported the daemon gone.
    Both are refused at save(), before any copy, with SnapshotError."""
    with client(keep3) as c:
        started = time.monotonic()
        huge = c.save(1, {"w": torch.zeros(16), "perm": list(range(10_000_000))})
        big = c.save(2, {"s": "x" * (40 << 20)})
        assert time.monotonic() - started < 5.0
        for future, match in ((huge, "torch.tensor"), (big, "limit")):
            with pytest.raises(SnapshotError, match=match):
                future.result()
        st = status(keep3)
        assert st.open_slots == 0 and st.open_leases == 0 and c.steps() == []


# --------------------------------------------------------------------- failed restores


def test_regression_failed_restore_half_overwrites_model(keep3):
    """t8_into / t21_gen: a restore that failed (changed layer shape, missing generator) had
    already overwritten the model and the data position (and the RNGs)."""
    job = "j" + uuid.uuid4().hex[:8]
    torch.manual_seed(0)
    old = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    with SnapshotClient(keep3.control, job=job, rank=0) as c:
        TrainingState(old, data={"offset": 64}).save(c, 7).result()
    torch.manual_seed(1)
    cases = [
        TrainingState(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 5)),
                      data={"offset": 0}),
        TrainingState(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)),
                      data={"offset": 0}, generators={"loader": torch.Generator()}),
        TrainingState(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)),
                      torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1),
                      data={"offset": 0}),
    ]
    for state in cases:
        before = {k: v.clone() for k, v in state.model.state_dict().items()}
        rng = torch.get_rng_state()
        with SnapshotClient(keep3.control, job=job, rank=0) as c:
            with pytest.raises(SnapshotError, match="nothing was (restored|written)"):
                state.restore(c)
            assert c.steps() == [7]
        assert all(torch.equal(before[k], v) for k, v in state.model.state_dict().items())
        assert state.data == {"offset": 0} and torch.equal(rng, torch.get_rng_state())
    assert status(keep3).open_leases == 0


def test_regression_into_mismatch_silently_fresh_tensors(keep3):
    """t8_into / t23_expand: restore(into=) silently returned fresh tensors on a dtype/shape
    mismatch or a missing key, and an expand()ed target failed after others were written."""
    with client(keep3) as c:
        c.save(1, {"a": torch.ones(3), "b": torch.ones(2, 2)}).result()
        bad_intos = [{"a": torch.zeros(3, dtype=torch.float64)}, {"b": torch.zeros(5)},
                     {"a": torch.zeros(3), "missing": torch.zeros(1)},
                     {"a": torch.zeros(3), "b": torch.zeros(2).expand(2, 2)}]
        for into in bad_intos:
            first = into["a"] if "a" in into else None
            with pytest.raises(SnapshotError, match="nothing was written"):
                c.restore(into=into)
            if first is not None and first.dtype == torch.float32:
                assert torch.count_nonzero(first) == 0
        target = torch.zeros(3)
        _, back = c.restore(into={"a": target})
        assert back["a"].data_ptr() == target.data_ptr() and torch.equal(target, torch.ones(3))
        # "b" came back fresh: a copy-on-write view of the version, leased while it lives
        assert status(keep3).open_leases == 1
        del back
        deadline = time.monotonic() + 10
        while status(keep3).open_leases and time.monotonic() < deadline:
            time.sleep(0.02)
        assert status(keep3).open_leases == 0


# --------------------------------------------------------------------- second review round


def test_regression_dedup_ignores_conj_and_neg_bits(keep3):
    """A conj() view shares its base's memory; stored once as the base, it came back
    un-conjugated."""
    with client(keep3) as c:
        a = torch.tensor([1 + 2j, 3 - 4j])
        x = torch.tensor([1 + 2j, 3 + 4j])
        c.save(1, {"a": a, "b": a.conj(), "im": x.imag, "neg_im": x.conj().imag}).result()
        _, back = c.restore()
        assert torch.equal(back["b"], a.conj().resolve_conj())
        assert torch.equal(back["neg_im"], torch.tensor([-2.0, -4.0]))


def test_regression_embedding_max_norm_torn(keep3):
    """nn.Embedding(max_norm=...) renormalises its weight in place during forward: a
    TrainingState snapshot copied in the background was torn (4 of 5)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(20000, 64, max_norm=1.0))
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    state = TrainingState(model, opt, rng=False)
    with client(keep3) as c:
        for step in range(4):
            model(torch.randint(0, 20000, (4096,))).sum().backward()
            opt.step()
            opt.zero_grad()
            expected = model[0].weight.detach().clone()
            state.save(c, step)
            model(torch.randint(0, 20000, (4096,)))       # renormalises rows in place
            c.wait()
            _, snap = c.restore(step=step)
            assert torch.equal(snap["model"]["0.weight"], expected), step


def test_regression_save_during_close_raises(keep3):
    """save() from another thread while close() flushed raised RuntimeError into the caller."""
    c = client(keep3)
    big = torch.zeros(32 << 20)
    c.save(1, {"t": big})
    errors = []

    def late():
        time.sleep(0.05)
        try:
            errors.append(c.save(2, {"t": torch.zeros(1)}).exception(timeout=30))
        except BaseException as exc:  # noqa: BLE001 - the bug: save() raised
            errors.append(exc)

    thread = threading.Thread(target=late)
    thread.start()
    c.close()
    thread.join()
    assert errors and (errors[0] is None or isinstance(errors[0], SnapshotError)), errors


def test_regression_hung_daemon_stalls_every_step(keep3):
    """A daemon that stops answering stalled every optimizer.step() for the request timeout;
    now a step waits at most step_grace once, then saves are skipped until it answers."""
    import os
    import signal

    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pid = status(keep3).pid if hasattr(status(keep3), "pid") else None
    with client(keep3, timeout=timedelta(seconds=5)) as c:
        c.protect(opt)
        c.save(0, {"m": model.state_dict()}).result()
        daemon = pid or _daemon_pid(keep3)
        os.kill(daemon, signal.SIGSTOP)
        try:
            worst = []
            for step in range(1, 5):
                c.save(step, {"m": model.state_dict()})
                model(torch.randn(2, 64)).sum().backward()
                started = time.monotonic()
                opt.step()
                worst.append(time.monotonic() - started)
        finally:
            os.kill(daemon, signal.SIGCONT)
        assert max(worst) < c.step_grace + 0.5 and sum(worst) < c.step_grace + 1.0, worst
        c.wait()
        assert c.save(10, {"m": model.state_dict()}).result(timeout=30) == 10
        assert c.stats().skipped >= 1


def _daemon_pid(spec):
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "snapshotd" in " ".join(cmd) and spec.control in cmd:
            return proc.pid
    raise AssertionError(f"no daemon process for {spec.control}")


def test_regression_unicode_names_pass_size_check(keep3):
    """Non-ASCII names cost up to 6 bytes a character in the reply: a state that passed the
    size check committed and could never be restored."""
    with client(keep3) as c:
        key = "é" * 11000
        future = c.save(1, {f"{key}{i}": torch.zeros(1) for i in range(1000)})
        with pytest.raises(SnapshotError, match="limit"):
            future.result()
        assert c.steps() == []


def test_regression_export_of_an_older_step_drops_the_newer_ones(keep3, tmp_path):
    """snapshotctl export read each rank through restore(), which starts a new timeline: an
    export of the newest common step dropped a rank's newer versions. read() and export leave
    every version where it was."""
    from snapshotd.ops.export import export

    job = "j" + uuid.uuid4().hex[:8]
    with SnapshotClient(keep3.control, job=job, rank=0) as c0, \
            SnapshotClient(keep3.control, job=job, rank=1) as c1:
        for s in (1, 2):
            c0.save(s, {"w": torch.full((4,), float(s))}).result()
            c1.save(s, {"w": torch.full((4,), float(10 + s))}).result()
        c0.save(3, {"w": torch.full((4,), 3.0)}).result()       # rank 0 is one step ahead
        step, st = c0.read(2)
        assert step == 2 and torch.equal(st["w"], torch.full((4,), 2.0))
        assert c0.steps() == [1, 2, 3]
        result = export(keep3.control, job, None, str(tmp_path / "out"), progress=False)
        assert result["step"] == 2 and result["bytes"] == 2 * 16
        assert c0.steps() == [1, 2, 3] and c1.steps() == [1, 2]


# --------------------------------------------------------------------- issue 24, finding 9


class AcceleratedLike(torch.optim.Optimizer):
    """What accelerate's ``AcceleratedOptimizer`` is to snapshotd: a ``torch.optim.Optimizer``
    subclass that never ran ``Optimizer.__init__`` (no step hooks of its own) and steps the
    optimizer it holds as ``.optimizer``."""

    def __init__(self, optimizer):  # noqa: D107 - no super().__init__, as accelerate's
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none)

    def step(self, closure=None):
        return self.optimizer.step(closure)


def test_regression_accelerate_wrapped_optimizer_crashes_first_save(keep3):
    """Issue 24, finding 9: with an accelerate-wrapped optimizer the first
    ``TrainingState.save`` raised ``AttributeError: ... '_optimizer_step_pre_hooks'`` into the
    training step (``client.protect`` ran outside the save's future). The wrapper is looked
    through: every save commits, the optimizer's step waits for the copy (the hook is on the
    optimizer it steps), and a restore puts the moments back."""
    model = torch.nn.Linear(64, 64)
    optimizer = AcceleratedLike(torch.optim.AdamW(model.parameters(), lr=1e-2))
    with client(keep3) as c:
        state = TrainingState(model, optimizer, rng=False)
        for step in range(3):
            model(torch.randn(8, 64)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            future = state.save(c, step)
        assert future.result() == 2 and c.stats().failed == 0
        assert state.optimizer is optimizer.optimizer
        assert c.stats().committed == 3 and c.stats().saves == 3
        assert len(optimizer.optimizer._optimizer_step_pre_hooks) == 1
        saved = {k: v.clone() for k, v in optimizer.optimizer.state[model.weight].items()}
        model(torch.randn(8, 64)).pow(2).mean().backward()
        optimizer.step()
        assert state.restore(c) == 2
        back = optimizer.optimizer.state[model.weight]
        assert all(torch.equal(back[k], saved[k]) for k in saved)


def test_regression_training_state_save_raises_into_the_step(keep3, caplog):
    """Issue 24, finding 9: no ``TrainingState.save`` path raises into the training step. A
    data position whose ``state_dict()`` fails, and an object passed as the optimizer that
    ``protect`` refuses: each save returns a failed future naming the cause, every one is
    counted, the first is logged as a warning, and the next good save commits."""
    class Flaky:
        fail = True

        def state_dict(self):
            if self.fail:
                raise RuntimeError("sampler state unavailable")
            return {"offset": 3}

        def load_state_dict(self, state):
            pass

    model = torch.nn.Linear(4, 4)
    data = Flaky()
    with client(keep3) as c:
        state = TrainingState(model, torch.optim.SGD(model.parameters(), lr=0.1), data=data,
                              rng=False)
        with pytest.warns(RuntimeWarning, match="sampler state unavailable"):
            first = state.save(c, 1)
        second = state.save(c, 2)
        for future in (first, second):
            with pytest.raises(SnapshotError, match="gathering the training state failed: "
                                                    "RuntimeError: sampler state unavailable"):
                future.result()
        bad = TrainingState(model, object(), rng=False)          # not an optimizer at all
        with pytest.raises(SnapshotError, match="protect\\(\\) takes an optimizer"):
            bad.save(c, 3).result()
        assert c.stats().failed == 3 and c.stats().saves == 3
        assert "sampler state unavailable" in caplog.text
        data.fail = False
        assert state.save(c, 4).result() == 4 and c.stats().committed == 1


# --------------------------------------------------------------------- issue 25, finding 2


def test_regression_torn_snapshot_committed_silently(keep3, caplog):
    """Issue 25, finding 2: with ``copy="lazy"`` a tensor changed in place before its
    background copy ended was committed torn, without a word. Its version counter moved: the
    save fails loudly (its future raises naming the tensor, counted as torn, logged once),
    nothing of it is committed, and a save whose tensors stay untouched commits."""
    import logging

    caplog.set_level(logging.WARNING, "snapshotd_client")
    with client(keep3, copy="lazy") as c:
        c.save(1, {"w": torch.zeros(1024), "t": torch.zeros(1024)}).result()
        w, t = torch.zeros(1024), torch.zeros(1024)
        for step in (2, 3):
            with c._handoff:                  # the copy cannot start before the change
                future = c.save(step, {"w": w, "t": t})
                t.add_(1.0)
            with pytest.raises(SnapshotError, match=r"tensor '/t' was changed in place while "
                                                    r"it was being copied"):
                future.result()
        assert c.stats().torn == 2 and c.stats().failed == 2 and c.stats().committed == 1
        assert caplog.text.count("refused as torn") == 1
        assert c.steps() == [1]                          # the torn bytes never committed
        assert c.save(4, {"w": w, "t": t}).result() == 4   # untouched: committed
        _, back = c.restore()
        assert torch.equal(back["t"], torch.full((1024,), 2.0))


def test_protected_training_never_trips_the_torn_check(keep3):
    """Issue 25, finding 2: under ``copy="auto"`` and ``copy="lazy"`` with ``protect``,
    ``optimizer.step()`` waits for the copy in flight, so training that saves every step and
    never waits itself commits every save and none is refused as torn (the next forward and
    backward overlap the copy; BatchNorm's buffers, changed by the forward, are copied at
    save() under auto)."""
    for mode in ("auto", "lazy"):
        model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(6)])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with client(keep3, copy=mode) as c:
            state = TrainingState(model, opt, rng=False)
            for step in range(12):
                model(torch.randn(64, 512)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                state.save(c, step)
            c.wait()
            stats = c.stats()
            assert stats.torn == 0 and stats.failed == 0, (mode, stats)
            assert stats.committed + stats.skipped == 12 and stats.committed >= 1, stats

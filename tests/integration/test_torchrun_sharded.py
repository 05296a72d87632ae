"""Real torchrun jobs of sharded training (issue 13): a rank SIGKILLed, the job resumes from
snapshotd and ends bit-identical to an uninterrupted run, parameters and AdamW moments alike.

Every test trains ``examples/train_fsdp.py --size tiny`` under ``torch.distributed.run
--standalone`` (c10d rendezvous, gloo on loopback, ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``; a
restart under static rendezvous has been seen to hang in gloo set-up) with one real snapshotd,
kills one rank at a random step with SIGKILL, and compares the full parameters and AdamW state
(``exp_avg``, ``exp_avg_sq``, ``step``, gathered from the shards) with an uninterrupted
``--no-snapshot`` run.

- FSDP2 (``fully_shard``) on 2 ranks: always (about 22 s alone on two cores).
- FSDP2 x tensor parallel on a 2x2 mesh, HSDP on a 2x2 mesh (replicate x shard), and FSDP2
  through DCP's ``get_state_dict``/``set_state_dict``: with ``SNAPSHOTD_FAULT_RUNS=long``
  (``make faults``), 35-65 s each on two cores. The same layouts are checked in every run,
  without torchrun, by test_sharded_state.py.
"""

import os
import random
import time
import uuid
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import list_versions, torchrun_standalone
from snapshotd.ops.export import export
from snapshotd.tools.torchrun import (
    compare_params,
    read_jsonl,
    reference_run,
)

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_fsdp.py"
TINY = ["--size", "tiny"]
LONG = os.environ.get("SNAPSHOTD_FAULT_RUNS", "quick").strip().lower() == "long"


def killed_rank_resumes_bit_exact(cluster_factory, tmp_path, nproc, *args, steps=24,
                                  coded=False):
    rng = random.Random(os.environ.get("SNAPSHOTD_TEST_SEED") or time.time_ns())
    rank, step = rng.randrange(nproc), rng.randrange(4, steps - 2)
    why = f"(rank {rank} of {nproc} killed at step {step}, {args})"
    # keep=4: commits are asynchronous, so when a rank dies in step s the others may have
    # committed s while its newest is s-2 or s-3 (see test_torchrun.py).
    # coded: a second daemon codes the first one's data (k=1, m=1), so replicated state is
    # split across its replicas (TrainingState's split_replicas).
    cluster = (cluster_factory(2, k=1, m=1, args=["--keep", "4", "--insecure"]) if coded
               else cluster_factory(1, args=["--keep", "4"]))
    cluster.start()
    out = tmp_path / "faulted"
    job = f"s-{uuid.uuid4().hex[:6]}"
    torchrun_standalone(SCRIPT, nproc, cluster.specs[0].control, out, "--steps", str(steps),
                        "--job", job, "--fail-at", f"{rank}:{step}", *args)
    events = read_jsonl(out / "events.jsonl")
    starts = [e for e in events if e["event"] == "start"]
    first = [e for e in starts if e["attempt"] == 0]
    restarted = [e for e in starts if e["attempt"] == 1]
    assert len(first) == nproc and all(e["restored"] is None for e in first), (why, starts)
    assert sorted(e["rank"] for e in restarted) == list(range(nproc)), (why, starts)
    restored = {e["restored"] for e in restarted}
    assert len(restored) == 1, (why, starts)            # every rank restored the same step
    (restored,) = restored
    # The killed rank died in step `step` before its optimizer step: it saved up to step-1,
    # of which the last one or two commits may still have been in flight.
    assert restored is not None and step - 3 <= restored <= step - 1, (why, restored)
    losses = read_jsonl(out / "loss.jsonl")
    assert [r["step"] for r in losses if r["attempt"] == 1][0] == restored + 1, why
    stats = [e for e in events if e["event"] == "stats" and e["attempt"] == 1]
    assert len(stats) == nproc, (why, stats)
    for s in stats:                          # every save of the resumed run was committed
        assert s["failed"] == 0 and s["committed"] == steps - restored - 1, (why, s)

    ref = tmp_path / "reference"
    rc = reference_run(SCRIPT, [*TINY, "--steps", str(steps), *args], ref, nproc, timeout=200)
    assert rc == 0, (ref / "torchrun.log").read_text()[-6000:]
    final = torch.load(out / "final.pt", weights_only=True)
    moments = [k for k in final if k.startswith(("exp_avg/", "exp_avg_sq/"))]
    assert len(moments) == 2 * len([k for k in final if k.startswith("param/")]) > 0
    same, detail = compare_params(ref / "final.pt", out / "final.pt")
    assert same, (why, detail)
    if coded:
        # HSDP on 2x2: a rank's local shards are half of the global parameters and moments;
        # split over the replica pair, its version holds about half of those.
        model_bytes = sum(t.numel() * t.element_size() for k, t in final.items()
                          if k.startswith(("param/", "exp_avg/", "exp_avg_sq/")))
        held = list_versions(cluster.specs[0], job)
        newest = [v.nbytes for v in held if v.step == max(h.step for h in held)]
        assert len(newest) == nproc and all(
            0.2 * model_bytes < n < 0.35 * model_bytes for n in newest), (newest, model_bytes)
        # snapshotctl export writes every rank whole, each replicated shard taken from the rank
        # of the replica pair that stored it: the pairs (0, 2) and (1, 3) hold equal shards.
        export(cluster.specs[0].control, job, None, str(tmp_path / "export"), progress=False)
        dcp_to_torch_save(tmp_path / "export", tmp_path / "export.pt")
        # (weights_only=False: the trainer's data position and RNG states hold numpy arrays)
        exported = torch.load(tmp_path / "export.pt", weights_only=False)
        for a, b in ((0, 2), (1, 3)):
            ma, mb = exported[f"rank{a}"]["model"], exported[f"rank{b}"]["model"]
            assert ma.keys() == mb.keys() and all(
                isinstance(ma[k], torch.Tensor) and torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.timeout(300)
def test_fsdp2_rank_killed_resumes_bit_exact(cluster_factory, tmp_path):
    killed_rank_resumes_bit_exact(cluster_factory, tmp_path, 2)


@pytest.mark.skipif(not LONG, reason="4-rank torchrun jobs: SNAPSHOTD_FAULT_RUNS=long "
                                     "(make faults); test_sharded_state.py covers the layouts")
@pytest.mark.timeout(400)
@pytest.mark.parametrize("nproc, args, coded", [
    (4, ["--parallel", "fsdp-tp"], False),
    (4, ["--parallel", "hsdp", "--state-dicts", "dcp"], True),
    (2, ["--state-dicts", "dcp"], False),
], ids=["fsdp-tp-2x2", "hsdp-2x2-dcp-split", "fsdp-dcp"])
def test_sharded_rank_killed_resumes_bit_exact(cluster_factory, tmp_path, nproc, args, coded):
    killed_rank_resumes_bit_exact(cluster_factory, tmp_path, nproc, *args, coded=coded)


@pytest.mark.skipif(not LONG, reason="three torchrun jobs, about 40 s: SNAPSHOTD_FAULT_RUNS=long "
                                     "(make faults); test_elastic.py reshards in every run")
@pytest.mark.timeout(400)
def test_the_fsdp2_example_restarted_at_4_then_3_ranks_restores_every_global_tensor(
        cluster_factory, tmp_path):
    """examples/train_fsdp.py (DCP state dicts) trains 8 steps on 2 ranks; torchrun jobs of
    the same script at 4 and then 3 ranks (uneven shards) restore its last step from the
    daemon's memory, resharded, and have nothing left to train: their final parameters and
    AdamW moments (gathered full) are the 2-rank job's, bit for bit."""
    cluster = cluster_factory(1, args=["--keep", "3"])
    cluster.start()
    job = f"e-{uuid.uuid4().hex[:6]}"
    finals = []
    for nproc in (2, 4, 3):
        out = tmp_path / f"w{nproc}"
        torchrun_standalone(SCRIPT, nproc, cluster.specs[0].control, out, "--steps", "8",
                            "--job", job, "--state-dicts", "dcp", run=job)
        starts = [e for e in read_jsonl(out / "events.jsonl") if e["event"] == "start"]
        assert sorted(e["rank"] for e in starts) == list(range(nproc))
        assert {e["restored"] for e in starts} == ({None} if nproc == 2 else {7}), starts
        finals.append(out / "final.pt")
    for other in finals[1:]:
        same, detail = compare_params(finals[0], other)
        assert same, (other, detail)
    moments = [k for k in torch.load(finals[0], weights_only=True) if k.startswith("exp_avg")]
    assert moments, "the optimizer state is compared too"


@pytest.mark.skipif(not LONG, reason="a 3-node torchrun job and its reference, about 90 s: "
                                     "SNAPSHOTD_FAULT_RUNS=long (make faults); make demo shows "
                                     "the same, test_elastic.py reshards in every run")
@pytest.mark.timeout(600)
def test_a_node_lost_for_good_under_torchrun_the_job_goes_on_at_fewer_ranks(
        cluster_factory, tmp_path):
    """Three nodes (a daemon and a torchrun agent each, c10d rendezvous, ``--nnodes=2:3``) train
    examples/train_fsdp.py; node 2 is lost for good (agent, trainer and daemon SIGKILLed, its
    memory removed, nothing replaces it): the two other agents go on with 2 nodes after the
    rendezvous' last call, their ranks restore the 3-rank layout's step from memory (node 2's
    shards decoded by the survivors' daemons) and train to the end. Every step trained at 3
    ranks is bit-identical to an uninterrupted 3-rank run (shard digests), and the restored
    global tensors are the saved ones (the saved layout's digests, recomputed from them)."""
    from snapshotd.tools.demo import digest_checks
    from snapshotd.tools.torchrun import TorchrunJob, resumed_record

    steps, args = 40, [*TINY, "--state-dicts", "dcp", "--digests"]
    ref = tmp_path / "reference"
    assert reference_run(SCRIPT, ["--steps", str(steps), *args], ref, 3, timeout=300) == 0
    cluster = cluster_factory(3, k=2, m=1, args=["--keep", "4", "--insecure"])
    cluster.start()
    out = tmp_path / "faulted"
    job_name = f"g-{uuid.uuid4().hex[:6]}"
    with TorchrunJob(cluster, SCRIPT, ["--steps", str(steps), *args, "--job", job_name,
                                       "--out", str(out), "--step-delay", "0.3"], out,
                     min_nodes=2, last_call=5.0) as job:
        job.start()
        deadline = time.monotonic() + 240
        while not [r for r in read_jsonl(out / "loss.jsonl") if r["step"] >= 15]:
            assert time.monotonic() < deadline and not job.finished(), "no progress"
            time.sleep(0.2)
        killed_at = time.time()
        job.lose_node(2)
        while not job.finished():
            assert time.monotonic() < deadline + 120, "the job did not finish"
            time.sleep(0.5)
        codes = job.returncodes()
    assert codes == {0: 0, 1: 0}, codes
    losses = read_jsonl(out / "loss.jsonl")
    assert resumed_record(losses, killed_at) is not None
    assert losses[-1]["step"] == steps - 1 and losses[-1]["world"] == 2
    events = read_jsonl(out / "events.jsonl")
    elastic = [e for e in events if e.get("event") == "elastic_check"]
    assert len(elastic) == 1 and elastic[0]["world_from"] == 3 and elastic[0]["world"] == 2
    assert elastic[0]["step"] >= 12
    for good, line in digest_checks(ref, out, events, 3, shrunk=True):
        assert good, line

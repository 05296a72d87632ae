"""``snapshotd demo``: a local multi-node cluster, a real torchrun job, real failures, recovery.

What it does, all on loopback (``make demo`` runs it):

1. Trains ``examples/train.py`` (a small GPT, DDP over gloo) once without interruption, as the
   reference.
2. Starts a :class:`~snapshotd.tools.localcluster.LocalCluster` (one snapshotd per "node", erasure
   coded across the nodes) and one ``torchrun`` agent per node, joined through torchrun's c10d
   rendezvous, and trains the same job again, snapshotting every step.
3. While it trains: SIGKILLs one trainer process (torchrun restarts the workers, which restore
   from their node's daemon), then kills a whole node (its agent, trainer and daemon) and
   starts a replacement node (an empty daemon rebuilding from its peers, and a new agent) in
   the same slot.
4. Prints a summary per failure, writes ``loss.png`` and checks that the final parameters are
   bit-identical to the reference run's. Exit code 0 only on a match.

Rendezvous on one machine: the demo hosts the rendezvous store itself (``is_host=0`` for every
agent), as an etcd or a dedicated store host would in production, so losing any node never
loses the rendezvous. Each node's agent gets its own loopback address (``--local-addr
127.0.0.1xx``); torchrun orders nodes by address when it assigns ranks, so a replacement node
gets the ranks of the node it replaces - the loopback stand-in for a stable host name
(StatefulSet ordinal). ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` makes every rendezvous round
publish a fresh master address, so no round depends on a process of an earlier one.

Job control lives in :mod:`snapshotd.tools.torchrun` (also used by the tests), what the demo
prints and plots in :mod:`snapshotd.tools.report`.
"""

from __future__ import annotations

import argparse
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from .localcluster import LocalCluster
from .report import Failure, Progress, breakdown_line, plot_loss, summary_table
from .torchrun import (
    JsonlTail,
    TorchrunJob,
    compare_params,
    find_script,
    make_keys,
    read_jsonl,
    rebuilt_bytes,
    reference_key,
    reference_run,
    resumed_record,
)

__all__ = ["main"]

def _parse(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="snapshotd demo", description=(
        "Local multi-node cluster on loopback: train a small GPT with torchrun, kill a "
        "trainer and then a whole node, recover from snapshotd, and check the final "
        "parameters against an uninterrupted run bit for bit."))
    ap.add_argument("--nodes", type=int, default=3, help="nodes (one daemon + one agent each)")
    ap.add_argument("--nproc-per-node", type=int, default=1, help="trainers per node")
    ap.add_argument("--k", type=int, default=None, help="data chunks per stripe "
                    "(default nodes-1)")
    ap.add_argument("--m", type=int, default=1, help="parity chunks per stripe")
    ap.add_argument("--steps", type=int, default=200, help="training steps")
    ap.add_argument("--size", default="small", choices=["small", "tiny"],
                    help="model size (examples/train.py --size)")
    ap.add_argument("--out", default="demo-out", help="output directory")
    ap.add_argument("--script", default=None, help="training script (examples/train.py)")
    ap.add_argument("--trainer-kill-at", type=float, default=0.3,
                    help="fraction of the steps at which a trainer is SIGKILLed")
    ap.add_argument("--node-kill-at", type=float, default=0.6,
                    help="fraction of the steps at which a whole node is killed")
    ap.add_argument("--kill-trainer-slot", type=int, default=0,
                    help="node whose trainer is killed")
    ap.add_argument("--kill-node", type=int, default=None,
                    help="node slot killed whole (default: the last one)")
    ap.add_argument("--replace-after", type=float, default=1.0,
                    help="seconds between the node loss and its replacement joining")
    ap.add_argument("--skip-node-loss", action="store_true",
                    help="inject only the trainer crash")
    ap.add_argument("--fresh-reference", action="store_true",
                    help="retrain the reference even if OUT/reference holds one made by the "
                         "same script, arguments and torch version")
    ap.add_argument("--timeout", type=float, default=600,
                    help="give up (FAIL) after this many seconds of the faulted run")
    ap.add_argument("--memory-limit", default="2GiB", help="each daemon's --memory-limit")
    ap.add_argument("--curve", action="store_true",
                    help="encrypt peer traffic: `snapshotctl keygen` into OUT/keys and start "
                         "every daemon with --keys (default: --insecure, plain TCP on "
                         "loopback)")
    args = ap.parse_args(list(argv))
    if args.nodes < 2:
        ap.error("--nodes must be at least 2 (a node loss needs peers)")
    if args.k is None:
        args.k = args.nodes - args.m
    if args.kill_node is None:
        args.kill_node = args.nodes - 1
    return args


def main(argv: Sequence[str] = ()) -> int:
    args = _parse(argv)
    script = Path(args.script) if args.script else find_script()
    out = Path(args.out).resolve()
    ref_dir, run_dir = out / "reference", out / "faulted"
    shutil.rmtree(run_dir, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    world = args.nodes * args.nproc_per_node
    train_args = ["--steps", str(args.steps), "--size", args.size]
    progress = Progress()
    started = time.time()
    say = progress.say

    say(f"snapshotd demo: {args.nodes} nodes x {args.nproc_per_node} trainer(s), "
        f"RS(k={args.k}, m={args.m}) across nodes "
        f"({'CURVE' if args.curve else 'plain TCP, --insecure'}), {args.steps} steps of "
        f"{script.name} --size {args.size}; output in {out}")

    # 1. the reference ---------------------------------------------------------------------
    key = reference_key(script, [*train_args, f"--nproc={world}"])
    cached = (ref_dir / "final.pt").exists() and (ref_dir / "key.txt").exists() and (
        (ref_dir / "key.txt").read_text() == key)
    if cached and not args.fresh_reference:
        say("[1/3] reference run: reusing " + str(ref_dir / "final.pt")
            + " (same script, arguments and torch; --fresh-reference to retrain)")
    else:
        say(f"[1/3] reference run: torchrun --standalone --nproc-per-node={world}, "
            "no snapshots, no failures")
        shutil.rmtree(ref_dir, ignore_errors=True)
        t_ref = time.time()

        def ref_progress(rec: dict | None) -> None:
            if rec is not None:
                progress.update(f"  reference  step {rec['step'] + 1:>4}/{args.steps}  "
                                f"loss {rec['loss']:.3f}  {time.time() - t_ref:5.1f}s")

        rc = reference_run(script, train_args, ref_dir, world, timeout=args.timeout,
                           progress=ref_progress)
        if rc != 0 or not (ref_dir / "final.pt").exists():
            say(f"\nFAIL: the reference run exited with {rc}; see {ref_dir}/torchrun.log")
            return 1
        (ref_dir / "key.txt").write_text(key)
        say(f"  reference done in {time.time() - t_ref:.1f}s")

    # 2. the cluster and the faulted run ----------------------------------------------------
    daemon_args = ["--memory-limit", args.memory_limit]
    keys: str | None = None
    if args.curve:                             # CURVE-encrypted peer traffic, as in production
        keys = make_keys(out / "keys")
    else:                                      # plain TCP on loopback
        daemon_args.append("--insecure")
    for old in out.glob("cluster-*"):          # daemon logs of an earlier demo run
        shutil.rmtree(old, ignore_errors=True)
    workdir = out / f"cluster-{uuid.uuid4().hex[:6]}"      # unique: names the shm dirs
    job_name = f"demo-{uuid.uuid4().hex[:6]}"
    failures: list[Failure] = []
    t0 = time.time()
    ok = False
    with LocalCluster(args.nodes, str(workdir), k=args.k, m=args.m, args=daemon_args,
                      keys=keys) as cluster:
        cluster.start()
        say(f"[2/3] cluster up: {args.nodes} daemons "
            + ", ".join(f"node{s.slot}={s.listen}" for s in cluster.specs)
            + f"; starting {args.nodes} torchrun agents (c10d rendezvous)")
        job = TorchrunJob(cluster, script, [*train_args, "--job", job_name, "--out",
                                            str(run_dir)], run_dir,
                          nproc_per_node=args.nproc_per_node)
        with job:
            t0 = time.time()
            job.start()
            ok = _drive(job, args, run_dir, failures, progress, t0)
            if ok:
                codes = job.wait(60)
                ok = all(c == 0 for c in codes.values())
                if not ok:
                    say(f"  agents exited with {codes}; see {run_dir}/node*-agent*.log")

    # 3. results -----------------------------------------------------------------------------
    losses = read_jsonl(run_dir / "loss.jsonl")
    starts = [e for e in read_jsonl(run_dir / "events.jsonl") if e.get("event") == "start"]
    for f in failures:
        f.fill(losses, starts, job)
    say("")
    say("[3/3] results")
    say(summary_table(failures, t0))
    say("  injected: wall time since the job started / newest step logged at the kill; "
        "detected: first agent report of the failure; steps lost: steps trained again; "
        "s to resume: kill to the first step completed after the restore")
    say("  time to resume, by phase (each ends when the last rank is through it):")
    for f in failures:
        say(breakdown_line(f))
    try:
        plot_loss(out / "loss.png", read_jsonl(ref_dir / "loss.jsonl"), losses, failures, t0)
        say(f"  loss curve: {out / 'loss.png'}")
    except Exception as exc:  # noqa: BLE001 - the plot is a nicety, never the verdict
        say(f"  (no loss plot: {exc})")
    problems = []
    if not ok:
        problems.append("the faulted run did not finish cleanly")
    for f in failures:
        if f.restored is None:
            problems.append(f"{f.kind}: no restart observed")
        elif f.restored_step is None:
            problems.append(f"{f.kind}: ranks restored different steps {f.restored}"
                            if len(set(f.restored)) > 1 else f"{f.kind}: nothing restored")
    final = run_dir / "final.pt"
    if final.exists():
        same, detail = compare_params(ref_dir / "final.pt", final)
        say(f"  final parameters vs the uninterrupted run: {detail}")
        if not same:
            problems.append("final parameters differ from the reference")
    else:
        problems.append("the faulted run wrote no final parameters")
    total = time.time() - started
    if problems:
        say(f"FAIL ({total:.0f}s): " + "; ".join(problems))
        return 1
    say(f"PASS ({total:.0f}s): {len(failures)} failure(s) recovered from snapshotd, final "
        "model bit-identical to the uninterrupted run")
    return 0


def _drive(job: TorchrunJob, args: argparse.Namespace, run_dir: Path,
           failures: list[Failure], progress: Progress, t0: float) -> bool:
    """Watch the faulted run, inject the failures, print progress; False on timeout/crash."""
    say = progress.say
    losses, events = JsonlTail(run_dir / "loss.jsonl"), JsonlTail(run_dir / "events.jsonl")
    trainer_at = int(args.steps * args.trainer_kill_at)
    node_at = int(args.steps * args.node_kill_at)
    pending_replace: float | None = None
    step, loss = -1, float("nan")
    deadline = t0 + args.timeout
    while True:
        for rec in losses.poll():
            step, loss = rec["step"], rec["loss"]
        for ev in events.poll():
            if ev.get("event") != "start" or ev["rank"] != 0 or not failures:
                continue
            if ev["restored"] is None:
                what = "nothing restored, training starts over"
            else:
                what = f"every rank restored step {ev['restored']} in {ev['restore_s']:.2f}s"
            say(f"  {ev['time'] - t0:6.1f}s  workers restarted (attempt {ev['attempt']}): {what}")
        now = time.time()
        last = failures[-1] if failures else None
        recovered = last is None or resumed_record(losses.records, last.injected_at) is not None
        if recovered and not failures and step + 1 >= trainer_at:
            slot = args.kill_trainer_slot
            pid = job.kill_trainer(slot)
            if pid is not None:
                failures.append(Failure(f"trainer crash (node{slot})", slot, time.time(),
                                        step))
                say(f"  {time.time() - t0:6.1f}s  step {step}: SIGKILL trainer pid {pid} on "
                    f"node{slot}")
        elif (recovered and len(failures) == 1 and not args.skip_node_loss
              and step + 1 >= node_at):
            slot = args.kill_node
            job.kill_node(slot)
            failures.append(Failure(f"node loss (node{slot})", slot, time.time(), step))
            say(f"  {time.time() - t0:6.1f}s  step {step}: node{slot} lost: SIGKILL its "
                "torchrun agent, trainer and snapshotd")
            pending_replace = time.time() + args.replace_after
        if pending_replace is not None and now >= pending_replace:
            pending_replace = None
            slot = args.kill_node
            job.replace_node(slot)
            say(f"  {time.time() - t0:6.1f}s  replacement node{slot}: empty snapshotd started "
                "(rebuilds from peers), new torchrun agent joining the rendezvous")
        if recovered and last is not None and "scraped" not in last.extra:
            last.extra["scraped"] = True
            value = rebuilt_bytes(job.cluster.specs[last.slot].metrics_port)
            last.rebuilt = value
            if value is None:
                last.note = "(metric not exported)"
        if job.finished() and pending_replace is None:
            say(f"  step {step + 1}/{args.steps}  loss {loss:.3f}  {now - t0:5.1f}s  "
                "all agents exited")
            return True
        if now > deadline:
            say(f"  timed out after {args.timeout:.0f}s at step {step}")
            return False
        marks = ", ".join(f.kind for f in failures) or "none yet"
        progress.update(f"  step {step + 1:>4}/{args.steps}  loss {loss:.3f}  "
                        f"{now - t0:5.1f}s  failures: {marks}")
        time.sleep(0.2)

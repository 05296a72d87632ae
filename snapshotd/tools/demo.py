"""``snapshotd demo``: a local multi-node cluster, a real torchrun job, real failures, recovery.

What it does, all on loopback (``make demo`` runs it):

1. Trains ``examples/train_fsdp.py`` (a small GPT, FSDP2 over gloo: every rank holds a shard of
   the parameters and AdamW moments) once without interruption, as the reference.
2. Starts a :class:`~snapshotd.tools.localcluster.LocalCluster` (one snapshotd per "node", erasure
   coded across the nodes) and one ``torchrun`` agent per node, joined through torchrun's c10d
   rendezvous with elastic membership (``--nnodes=N-1:N``), and trains the same job again,
   snapshotting every step.
3. While it trains: SIGKILLs one trainer process (torchrun restarts the workers, which restore
   from their node's daemon); kills a whole node (its agent, trainer and daemon, and its memory)
   and starts a replacement node (an empty daemon rebuilding from its peers, and a new agent)
   in the same slot; and at last loses a node for good: nothing replaces it, the other agents
   go on with one node fewer after torchrun's last call, and the smaller job restores from
   memory at its new world size, the lost node's shards decoded from the survivors' data and
   parity (issue 14).
4. Prints a summary per failure, writes ``loss.png`` and checks the result bit for bit: every
   step trained at the original world size against the uninterrupted run (a digest of every
   rank's shards after every step), and the state restored at the new world size against the
   saved global tensors of that step (the digests the saved ranks' shards had, recomputed from
   the restored full tensors). Exit code 0 only if every check holds.

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

#: What the demo trains by default: FSDP2, the state captured through DCP's state dicts (so
#: that it can be resharded), a digest of every rank's shards after every step.
SCRIPT = "train_fsdp.py"
SCRIPT_ARGS = ["--state-dicts", "dcp", "--digests"]


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="snapshotd demo", description=(
        "Local multi-node cluster on loopback: train a small GPT with FSDP2 under torchrun, "
        "kill a trainer, then a whole node (replaced), then lose a node for good (the job goes "
        "on with fewer ranks); recover each time from snapshotd's memory and check the state "
        "bit for bit against an uninterrupted run."))
    ap.add_argument("--nodes", type=int, default=3, help="nodes (one daemon + one agent each)")
    ap.add_argument("--nproc-per-node", type=int, default=1, help="trainers per node")
    ap.add_argument("--k", type=int, default=None, help="data chunks per stripe "
                    "(default nodes-1)")
    ap.add_argument("--m", type=int, default=1, help="parity chunks per stripe")
    ap.add_argument("--steps", type=int, default=150, help="training steps")
    ap.add_argument("--size", default="small", choices=["small", "tiny"],
                    help="model size (examples/train.py --size)")
    ap.add_argument("--out", default="demo-out", help="output directory")
    ap.add_argument("--script", default=None,
                    help=f"training script (default examples/{SCRIPT} {' '.join(SCRIPT_ARGS)}; "
                    "another script gets no extra arguments and must write final.pt; the "
                    "node lost for good needs --state-dicts dcp)")
    ap.add_argument("--trainer-kill-at", type=float, default=0.25,
                    help="fraction of the steps at which a trainer is SIGKILLed")
    ap.add_argument("--node-kill-at", type=float, default=0.5,
                    help="fraction of the steps at which a whole node is killed (replaced)")
    ap.add_argument("--node-lost-at", type=float, default=0.75,
                    help="fraction of the steps at which a node is lost for good")
    ap.add_argument("--kill-trainer-slot", type=int, default=0,
                    help="node whose trainer is killed")
    ap.add_argument("--kill-node", type=int, default=None,
                    help="node slot killed whole and replaced (default: the last one)")
    ap.add_argument("--lose-node", type=int, default=None,
                    help="node slot lost for good (default: the last one)")
    ap.add_argument("--replace-after", type=float, default=1.0,
                    help="seconds between the node loss and its replacement joining")
    ap.add_argument("--last-call", type=float, default=10.0,
                    help="torchrun rendezvous last call (s): how long the agents wait for a "
                         "missing node before they go on with fewer (the replacement must "
                         "join within it)")
    ap.add_argument("--skip-node-loss", action="store_true",
                    help="inject only the trainer crash")
    ap.add_argument("--skip-shrink", action="store_true",
                    help="lose no node for good (the final parameters are then compared)")
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
    if args.lose_node is None:
        args.lose_node = args.nodes - 1
    if args.skip_node_loss:
        args.skip_shrink = True
    return args


def main(argv: Sequence[str] = ()) -> int:
    args = _parse(argv)
    script = Path(args.script) if args.script else find_script(SCRIPT)
    extra = [] if args.script else list(SCRIPT_ARGS)
    out = Path(args.out).resolve()
    ref_dir, run_dir = out / "reference", out / "faulted"
    shutil.rmtree(run_dir, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    world = args.nodes * args.nproc_per_node
    train_args = ["--steps", str(args.steps), "--size", args.size, *extra]
    progress = Progress()
    started = time.time()
    say = progress.say

    say(f"snapshotd demo: {args.nodes} nodes x {args.nproc_per_node} trainer(s), "
        f"RS(k={args.k}, m={args.m}) across nodes "
        f"({'CURVE' if args.curve else 'plain TCP, --insecure'}), {args.steps} steps of "
        f"{script.name} {' '.join(train_args[2:])}; output in {out}")

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
            + f"; starting {args.nodes} torchrun agents (c10d rendezvous"
            + ("" if args.skip_shrink else f", --nnodes={args.nodes - 1}:{args.nodes}") + ")")
        job = TorchrunJob(cluster, script, [*train_args, "--job", job_name, "--out",
                                            str(run_dir)], run_dir,
                          nproc_per_node=args.nproc_per_node,
                          min_nodes=args.nodes if args.skip_shrink else args.nodes - 1,
                          last_call=args.last_call)
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
    events = read_jsonl(run_dir / "events.jsonl")
    starts = [e for e in events if e.get("event") == "start"]
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
    checks = digest_checks(ref_dir, run_dir, events, world, shrunk=not args.skip_shrink)
    for good, line in checks:
        say(f"  {'ok  ' if good else 'FAIL'} {line}")
        if not good:
            problems.append(line)
    total = time.time() - started
    if problems:
        say(f"FAIL ({total:.0f}s): " + "; ".join(problems))
        return 1
    say(f"PASS ({total:.0f}s): {len(failures)} failure(s) recovered from snapshotd's memory; "
        + ("every step at the original world size bit-identical to the uninterrupted run, and "
           "the state restored at the new world size equal to the saved one"
           if not args.skip_shrink else "final model bit-identical to the uninterrupted run"))
    return 0


def digest_checks(ref_dir: Path, run_dir: Path, events: list[dict], world: int,
            shrunk: bool) -> list[tuple[bool, str]]:
    """What the final check compares, one (passed, line) each.

    - Steps trained at the original world size: every rank's shard digest after every such
      step (all attempts, retrained steps included) equals the uninterrupted run's.
    - Each restore at another world size: the digests of the saved layout's shards recomputed
      from the restored full tensors (``elastic_check``) equal the uninterrupted run's digests
      at that step: every restored global tensor is the saved one, bit for bit.
    - Without a world-size change: the final parameters, as always.
    """
    out: list[tuple[bool, str]] = []
    ref = {(r["rank"], r["step"]): r["digest"] for r in read_jsonl(ref_dir / "digests.jsonl")}
    mine = [r for r in read_jsonl(run_dir / "digests.jsonl") if r["world"] == world]
    if ref and mine:
        bad = [r for r in mine if ref.get((r["rank"], r["step"])) != r["digest"]]
        steps = sorted({r["step"] for r in mine})
        out.append((not bad, f"steps {steps[0]}-{steps[-1]} at {world} ranks ({len(mine)} rank "
                    "steps, retrained ones included): every rank's parameters and AdamW "
                    "moments " + ("bit-identical to the uninterrupted run" if not bad else
                                  f"DIFFER at {len(bad)} rank steps, first step "
                                  f"{bad[0]['step']} rank {bad[0]['rank']}")))
    for ev in (e for e in events if e.get("event") == "elastic_check"):
        want = [ref.get((r, ev["step"])) for r in range(ev["world_from"])]
        same = None not in want and want == ev["digests"]
        out.append((same, f"restore of step {ev['step']} at {ev['world']} ranks (saved by "
                    f"{ev['world_from']}): every global parameter and AdamW moment "
                    + ("equal to the saved one, bit for bit" if same else
                       "DIFFERS from the saved one" if None not in want else
                       "not comparable (no reference digest of that step)")))
    if shrunk:
        if not any(e.get("event") == "elastic_check" for e in events):
            out.append((False, "no restore at another world size was observed"))
        after = [r for r in read_jsonl(run_dir / "digests.jsonl") if r["world"] != world]
        if after:
            steps = sorted({r["step"] for r in after})
            out.append((True, f"steps {steps[0]}-{steps[-1]} trained at "
                        f"{after[0]['world']} ranks from the restored state (no uninterrupted "
                        "run at that size to compare with)"))
    else:
        final = run_dir / "final.pt"
        if final.exists():
            out.append(compare_params(ref_dir / "final.pt", final))
            out[-1] = (out[-1][0], "final parameters vs the uninterrupted run: " + out[-1][1])
        else:
            out.append((False, "the faulted run wrote no final parameters"))
    return out


def _drive(job: TorchrunJob, args: argparse.Namespace, run_dir: Path,
           failures: list[Failure], progress: Progress, t0: float) -> bool:
    """Watch the faulted run, inject the failures, print progress; False on timeout/crash."""
    say = progress.say
    losses, events = JsonlTail(run_dir / "loss.jsonl"), JsonlTail(run_dir / "events.jsonl")
    trainer_at = int(args.steps * args.trainer_kill_at)
    node_at = int(args.steps * args.node_kill_at)
    lost_at = int(args.steps * args.node_lost_at)
    pending_replace: float | None = None
    step, loss = -1, float("nan")
    deadline = t0 + args.timeout
    rebuilt_before = 0.0
    while True:
        for rec in losses.poll():
            step, loss = rec["step"], rec["loss"]
        for ev in events.poll():
            if ev.get("event") != "start" or ev["rank"] != 0 or not failures:
                continue
            if ev["restored"] is None:
                what = "nothing restored, training starts over"
            elif ev.get("world_from"):
                what = (f"{ev['world']} ranks restored step {ev['restored']} saved by "
                        f"{ev['world_from']}, resharded from memory in {ev['restore_s']:.2f}s")
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
            failures.append(Failure(f"node loss (node{slot}), replaced", slot, time.time(),
                                    step))
            say(f"  {time.time() - t0:6.1f}s  step {step}: node{slot} lost: SIGKILL its "
                "torchrun agent, trainer and snapshotd")
            pending_replace = time.time() + args.replace_after
        elif (recovered and len(failures) == 2 and not args.skip_shrink
              and pending_replace is None and step + 1 >= lost_at):
            slot = args.lose_node
            survivors = [s for s in range(args.nodes) if s != slot and s not in job.lost]
            rebuilt_before = sum(rebuilt_bytes(job.cluster.specs[s].metrics_port) or 0.0
                                 for s in survivors)
            job.lose_node(slot)
            nodes = args.nodes - len(job.lost)
            failures.append(Failure(f"node lost for good (node{slot}): {args.nodes} -> "
                                    f"{nodes} nodes", slot, time.time(), step))
            failures[-1].extra["survivors"] = survivors
            say(f"  {time.time() - t0:6.1f}s  step {step}: node{slot} lost for good: SIGKILL "
                "its agent, trainer and snapshotd, its memory removed, no replacement; the "
                f"other agents go on with {nodes} nodes after the rendezvous' last call "
                f"({args.last_call:g}s)")
        if pending_replace is not None and now >= pending_replace:
            pending_replace = None
            slot = args.kill_node
            job.replace_node(slot)
            say(f"  {time.time() - t0:6.1f}s  replacement node{slot}: empty snapshotd started "
                "(rebuilds from peers), new torchrun agent joining the rendezvous")
        if recovered and last is not None and "scraped" not in last.extra:
            last.extra["scraped"] = True
            if "survivors" in last.extra:      # decoded by the survivors for the smaller job
                values = [rebuilt_bytes(job.cluster.specs[s].metrics_port)
                          for s in last.extra["survivors"]]
                value = None if None in values else (
                    sum(v for v in values if v is not None) - rebuilt_before)
                last.note = "(decoded)"
            else:
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

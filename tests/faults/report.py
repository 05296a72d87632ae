"""Render ``docs/reliability.md`` from the fault campaign's ``bench-out/reliability.json``.

    python tests/faults/report.py [--results bench-out/reliability.json] [--out docs/reliability.md]

The campaign (``python -m pytest -q tests/faults``, or ``make faults`` for the long one) writes
one row per fault: runs, runs that kept the invariant, ranks whose data was lost, the longest
stall a client saw, clear errors for faults beyond what the configuration survives, and the
command that reproduces it. A ``long`` section is shown first when there is one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

#: Faults in the order the table lists them (others follow, sorted).
ORDER = [
    "trainer SIGKILL before alloc", "trainer SIGKILL mid copy", "trainer SIGKILL before commit",
    "trainer SIGKILL after commit", "daemon SIGKILL mid-commit", "daemon SIGKILL mid-encode",
    "daemon SIGKILL mid-rebuild", "2 or fewer of 4 nodes lost at once (RS 2+2)",
    "3 of 4 nodes lost at once (RS 2+2)", "peer partitioned, then healed",
    "slow peer (20-150 ms one-way delay)", "slow peer (20-80 ms one-way delay)",
    "bit flips in a committed segment",
    "bit flip in parity held in daemon memory, then a node lost",
    "bit flips in a peer's segment, then another node lost",
    "bit flips with no group to repair from", "memory budget exhausted by concurrent saves",
]

#: Bugs the campaign found: (regression test, found by, bug, fix). All are fixed now.
BUGS = [
    ("test_regression_protected_state_lost_on_restart", "daemon SIGKILL mid-encode / "
     "mid-rebuild", "A daemon restarted on its memory adopts its versions as `local` and they "
     "never become `protected` again: the flag is not persisted (`Store.mark_protected` never "
     "rewrites the manifest) and `Protector.retry` re-sends data fragments that the parity "
     "holders can never complete into a stripe (the other data nodes do not re-send).",
     "Fixed: a first parity holder that already has a complete stripe answers a re-sent "
     "`PutData` with `Protected` (`Protector.on_put_data`), so `retry` re-protects adopted "
     "versions."),
    ("test_regression_partial_rebuild_not_resumed", "daemon SIGKILL mid-rebuild",
     "A rebuild cut short after installing some ranks is never resumed: "
     "`Recovery._recover_job` only considers steps newer than any step held, so the ranks not "
     "yet installed restore nothing (`step: None`, no error).",
     "Fixed: candidates are steps newer than the newest step held *whole*; ranks already "
     "installed are skipped (`Recovery._install`)."),
    ("test_regression_dropped_versions_resurrected_by_rebuild", "node loss after a restore",
     "Parity holders never learn that versions were dropped (`Store.drop`), so a replaced node "
     "rebuilds a version of the abandoned timeline, newer than the step the job agreed on.",
     "Fixed: a drop that removes a step from a node sends `Dropped` to the group; parity "
     "holders free that step's parity in the stripes the node is a data node of."),
    ("test_regression_parity_of_dropped_versions_never_freed", "node loss, load",
     "Parity of dropped versions (finished jobs, abandoned timelines) stays in "
     "`Protector._parity` forever and is charged to `--memory-limit`.",
     "Fixed with the same `Dropped` message."),
    ("test_regression_slow_heartbeat_answers_mark_peer_down", "slow peer",
     "`Heartbeats.beat_once` waits only 0.8 x `--heartbeat-interval` for each Pong and drops "
     "later ones: a live peer with a longer round trip is marked down whatever "
     "`--peer-timeout` says (with the defaults: any round trip over 0.8 s).",
     "Fixed: late Pongs count (`PeerLinks.late_pongs`)."),
    ("test_regression_unrepairable_checksum_error_reported_as_unknown_lease",
     "bit flips with no group to repair from", "`ControlServer._on_open` releases the lease "
     "twice when a checksum mismatch cannot be repaired: the client gets `unknown_lease` "
     "instead of `checksum_mismatch` naming the tensors.",
     "Fixed: one release."),
    ("test_regression_bad_fragment_aborts_rebuild", "bit flip in parity / in a peer's segment, "
     "then a node lost", "A rebuild uses the first k fragments of a stripe; one that fails its "
     "checksum (parity in RAM) or decodes to bytes failing the tensor checksums (a peer's "
     "damaged segment) aborts the whole recovery (only `RebuildError` is caught per job) "
     "instead of trying the other fragments, and the rank restores nothing.",
     "Fixed: `Recovery._fetch_k` replaces an unusable fragment by another source of the "
     "stripe; `GetData` verifies the tensors of the chunk it serves; every exception is caught"
     " per job and older versions are tried."),
    ("test_regression_open_with_negative_pid_pins_version", "control fuzzing",
     "`Store.lease` increments `version.leases` before `process_identity(pid)` raises "
     "`ValueError` for a negative pid: `internal` error, and the version is pinned forever.",
     "Fixed: the pid is checked before the lease is taken."),
    ("test_regression_lease_of_dead_pid_never_reaped", "control fuzzing",
     "A lease opened for a pid that is not running gets `pid_start=None`; `Store.reap` compares "
     "`None == None` and never reclaims it, pinning the version forever.",
     "Fixed: a pid that is not running is refused."),
    ("test_regression_put_parity_declared_length_allocated_before_check", "peer fuzzing",
     "`Protector.on_put_parity` allocates and zero-fills `msg.length` bytes before checking the "
     "payload size: one 4-byte request declaring 1 GiB raises the daemon's peak RSS by 1 GiB "
     "(a larger one gets it OOM-killed).",
     "Fixed: the payload size is checked first."),
    ("test_regression_parity_recreated_from_corrupt_peer_data", "bit flips in a peer's segment, "
     "then another node lost (long campaign)", "A replaced node re-creates the parity it held "
     "from the data nodes' chunks (`Recovery._recreate` via `GetData`), which are served "
     "without checking the tensor checksums: a peer's damaged segment is encoded into the new "
     "parity, and the damaged node's own repair then fails.",
     "Fixed: `GetData` refuses damaged chunks (`corrupt`) and the re-creation decodes the "
     "parity from the other fragments instead."),
    ("test_regression_restarted_holder_keeps_only_newest_parity", "daemon SIGKILL mid-encode "
     "(long campaign)", "A restarted parity holder re-creates parity only for the newest step "
     "whose data is complete (`Recovery._recreate_parity` stops at the first success); when "
     "that step is not protected everywhere, the parity of the newest *protected* step is gone "
     "and a single lost node cannot be rebuilt (`cannot_rebuild` with m=1 and one node lost).",
     "Fixed: parity is re-created for every step the data nodes hold (newest `keep`+2)."),
    ("test_regression_hardcoded_60s_peer_timeout_stalls_protection", "daemon SIGKILL "
     "mid-commit (long campaign)", "Peer calls use hard-coded timeouts (`PutData`/`PutParity` "
     "60 s, `Protected` 10 s) instead of `--peer-timeout`/`--encode-timeout`, and do not notice "
     "the peer dying: a request in flight when a peer dies holds one of the two encode threads "
     "for 60 s, so after a daemon restart protection stalls for about a minute (and SIGTERM "
     "waits for those calls too).",
     "Fixed: transfers are bounded by `--encode-timeout`, small calls by `--peer-timeout`."),
    ("test_regression_unhashable_op_is_internal_error", "control fuzzing",
     "`protocol.decode` looks `op` up in a dict without checking its type: a list or object "
     "`op` raises `TypeError` and is answered `internal` (both protocols).",
     "Fixed: `op` must be a string."),
]


def _fmt_stall(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


#: How the per-fault figures (the largest value over the runs) read in the notes column.
FIGURES = {
    "resume_after_heal_s": "protection resumed within {} s of the heal",
    "protected_after_s": "protected within {} s despite the slow peer",
    "refused_saves": "{} saves refused with memory_full",
    "errors": "{} error replies",
    "rss_growth_mib": "daemon RSS +{} MiB",
    "fd_growth": "fds +{}",
    "commits": "{} commits",
    "commits_per_s": "{} commits/s",
    "max_segment_files": "at most {} segment files",
    "segments_at_end": "{} segments mapped at the end (one fd each)",
}


def _notes(row: dict) -> str:
    parts = []
    for key, value in sorted(row.get("figures", {}).items()):
        parts.append(FIGURES.get(key, key.replace("_", " ") + " {}").format(value))
    for bug, count in sorted(row.get("known_bugs", {}).items()):
        parts.append(f"**{count} run(s) hit `{bug}`**")
    return "; ".join(parts)


def _rows(faults: dict) -> list[tuple[str, dict]]:
    known = [(name, faults[name]) for name in ORDER if name in faults]
    rest = sorted((n, r) for n, r in faults.items() if n not in ORDER)
    return known + rest


def section(mode: str, data: dict) -> str:
    faults = data.get("faults", {})
    lines = [f"### {mode} campaign", "",
             f"Base seed {data.get('base_seed')}, last updated {data.get('updated')}, "
             f"{data.get('machine', '')}.", "",
             "| fault | runs | survived | data lost | longest stall | clear errors | notes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    total_lost = known_lost = 0
    for name, row in _rows(faults):
        total_lost += row["lost"]
        known_lost += row.get("lost_in_known_bugs", 0)
        clear = (f"{row['clear_errors']}/{row['runs']}" if row.get("beyond_tolerance")
                 else "–")
        lines.append(f"| {name} | {row['runs']} | {row['survived']} | {row['lost']} | "
                     f"{_fmt_stall(row['longest_stall_s'])} | {clear} | {_notes(row)} |")
    if not total_lost:
        verdict = "."
    elif known_lost == total_lost:
        verdict = ": every one in a run that hit a known bug (listed below)."
    else:
        verdict = (f": {known_lost} in runs that hit a known bug (listed below), "
                   f"{total_lost - known_lost} not attributed: see the failures below.")
    lines += ["", f"Ranks with data lost in total: **{total_lost}**{verdict}", "",
              "<details><summary>Reproduce each row</summary>", ""]
    for name, row in _rows(faults):
        lines.append(f"- {name}: `{row['command']}`")
        for failure in row.get("failures", [])[:2]:
            lines.append(f"  - failed: {failure.splitlines()[0][:200]}")
    lines += ["", "</details>", ""]
    return "\n".join(lines)


HEADER = """# Reliability: the fault campaign

snapshotd's promise, checked after every injected fault: **every rank restores exactly its
newest committed version (or, after losing nodes, its newest protected one), bit for bit, or
gets a clear error when the fault exceeds what the configuration survives; and the daemons keep
serving.** The campaign in `tests/faults/` runs real daemons (`LocalCluster`, loopback TCP,
CURVE keys) and real trainer processes, injects each fault many times with seeded randomness,
and checks that invariant.

| | command | runs per fault | state per rank | time (2 cores) |
| --- | --- | --- | --- | --- |
| quick (CI, in `make test`) | `python -m pytest -q tests/faults` | 1-2 | 0.25-3 MiB | ~3 min |
| long | `make faults` (`SNAPSHOTD_FAULT_RUNS=long`) | 15-40; load 3 min | to 16 MiB | ~60 min |

Every run draws its choices (victims, sizes, kill delays, flipped bits, partition lengths)
from `random.Random(seed)`; a failure prints the seed and the command that replays it
(`SNAPSHOTD_FAULT_SEED=<seed> python -m pytest -q '<test id>'`). The rows below are written to
`bench-out/reliability.json` by the campaign; this page is rendered from it by
`python tests/faults/report.py` (the long campaign renders it itself when it ends).

Columns: *runs* of the fault; *survived*: runs after which the invariant held and the daemons
served; *data lost*: ranks whose committed (or, for node loss, protected) data did not come back
bit for bit; *longest stall*: the longest a client call waited in any run (a save, a restore
after a restart or a rebuild, a status request during a partition); *clear errors*: for faults
beyond what the configuration survives, runs where the rank got the expected clear error.
Fuzz rows count one run per request sent.
"""

METHODS_ROWS = [
    ("trainer SIGKILL at a point of save",
     "the trainer (`tests/faults/ftrainer.py`, forked from a zygote that imported torch once) "
     "patches the client to stop at the point (before `Alloc`, after the n-th tensor copy, "
     "before `Commit`, after the `Commit` reply), prints a marker, and is SIGKILLed while 0-2 "
     "other ranks save"),
    ("daemon SIGKILL mid-commit / mid-encode / mid-rebuild",
     "timing: the daemon is killed 0-400 ms into a loop of saves, 0-150 ms after a step was "
     "committed on every node (chunks and parity in flight), or 0-800 ms after a replacement "
     "started rebuilding; then restarted on the same memory"),
    ("node loss",
     "`m` (or `m+1`) daemons of a 4-node RS(2,2) group SIGKILLed together, their memory wiped, "
     "empty daemons started in their slots"),
    ("partition, slow peer",
     "every daemon reaches each peer through its own port of an asyncio TCP proxy; a partition "
     "*holds* a node's traffic (delivered on heal, as TCP retransmits) or *drops* it "
     "(connections reset on heal); a slow peer gets a one-way delay on every chunk"),
    ("bit flips",
     "in `/dev/shm` segment files; in parity the holder keeps in its own heap (located by "
     "content and flipped through `/proc/PID/mem`)"),
    ("memory, load",
     "a 24 MiB budget with 3-6 ranks of 1-4 MiB saving at once; 16 trainer processes saving "
     "back to back on one node, sampled for RSS, fds, segment files, bytes in use"),
    ("fuzzing",
     "hypothesis drives raw ZeroMQ DEALER sockets on the real control (ipc) and peer (tcp, "
     "`--insecure`) sockets"),
    ("attacks",
     "plain TCP, a foreign CURVE key pair and the cluster public key without its secret "
     "against a CURVE cluster; a whole daemon with another key or none in a cluster slot; a "
     "throwaway local user (`useradd`, `runuser`) against the control socket and the "
     "segments"),
]
METHODS = "## How each fault is made\n\n| fault | how |\n| --- | --- |\n" + "".join(
    f"| {fault} | {how} |\n" for fault, how in METHODS_ROWS)

NOTES = """## Other observations (no regression test)

- **Open: parity lives in the daemon's process memory.** A daemon restarted on its memory
  adopts its data segments but not the parity it held; it re-creates that parity from the data
  nodes' chunks (every step they still hold). A data node whose own newest step became
  protected evicts the older step (`--keep` plus the newest protected), while another node of
  the stripe, whose newest step is not protected yet, still depends on that older step's
  parity: it cannot be re-created, and a loss of that node in the seconds before its newest
  step is protected cannot be rebuilt (`cannot_rebuild`, naming the stripes that lack
  fragments). The long campaign hits this in about 4 of 30 `daemon SIGKILL mid-encode` runs
  (each a restart followed at once by a node loss, with m=1). The fix is to keep parity in the
  daemon's tmpfs directory next to the data segments (adopted on restart like them); until
  then, run with m ≥ 2 where restarts and losses can coincide.

- **The daemon trusts the pid a client sends.** A client that names a long-lived process
  (`pid` 1, say) in `Alloc` or `Open` pins that slot or version until the daemon restarts; the
  reaper only reclaims what belongs to processes that are gone. Checking the peer's
  credentials (SO_PEERCRED on the ipc socket, e.g. through a small AF_UNIX side channel at
  connect) or bounding how long an uncommitted slot may stay open would close it. The fuzzers
  only use live, short-lived pids for this reason.
- **One file descriptor per held segment.** The daemon keeps a mapping per segment (versions
  and the reuse pool, capped at 64) and CPython's `mmap` keeps a dup of the fd for each: the
  16-rank load holds about 50 fds more than an idle daemon, stable over minutes, not a leak; a
  node with many ranks and jobs needs `LimitNOFILE` well above the default 1024.
- **`cannot_rebuild` under-reports lost slots** when several empty replacements start together:
  they answer heartbeats, so the message lists only the asking slot ("lost slots [0] ... fewer
  than k fragments"). Counting a peer whose inventory holds nothing of the job as lost would make
  it exact.
- **Protection next to a slow peer is serial.** With a 150 ms one-way delay, 5 steps took up to
  10.6 s to be protected everywhere: the parity holder sends `Protected` to the data nodes one
  after another, and every encode task opens fresh peer connections (and CURVE handshakes).
- **With `--insecure`, half-assembled stripes are not charged to the budget**: a peer can park
  data fragments of made-up jobs until `--encode-timeout` expires them.
"""

ISOLATION = """## Job isolation (`--job-isolation`)

Without it, any process running as the daemon's user can name any job. With it:

- The first `Alloc` of a job binds the job to the token its client presents
  (`SNAPSHOTD_JOB_TOKEN`, or `SnapshotClient(token=...)`: generated by the launcher once per job
  and shared by its ranks, e.g. through torchrun's environment). The daemon keeps only its
  SHA-256, in memory and in every manifest (so a restarted daemon keeps the binding, and a
  rebuilt node gets it from the node manifest its peers hold).
- Every request naming a job (`Alloc`, `Open`, `ListVersions`, `Verify`, `Drop`, `Persist`)
  carries the token; a missing or wrong one is refused with `forbidden`, and nothing stored
  changes. `Status` lists job names and steps, not data.
- Operators use `snapshotctl --admin-token-file <shm-dir>/admin.token` (a fresh token written
  by the daemon at start, mode 0600 in its 0700 directory: whoever can read it can read the
  segments anyway).
- Peer traffic is unchanged (CURVE already authenticates daemons).
- Left open: slot and lease numbers are small integers, so a hostile local client that guesses
  one can `Abort` another job's write in flight or `Release` its lease (neither reads nor
  changes stored data). Per-uid isolation (SO_PEERCRED) does not help when all jobs run as one
  service user, the common case on shared training nodes; tokens do.
"""


def render(results: dict) -> str:
    parts = [HEADER, "## Results", ""]
    for mode in ("long", "quick"):
        if mode in results:
            parts.append(section(mode, results[mode]))
    if not any(mode in results for mode in ("long", "quick")):
        parts.append("No results yet: run the campaign first.\n")
    parts += ["## Bugs found", "",
              "Each has a regression test in `tests/faults/test_fault_regressions.py`, named "
              "after it (marked `xfail(strict=True)` while the bug was open; a fault run that "
              "hits an open bug is counted, data lost included, and marks its campaign test "
              "xfail, naming the bug). All of them are fixed now and their tests run for real.",
              "", "| regression test | found by | bug | fix |", "| --- | --- | --- | --- |"]
    parts += [f"| `{test}` | {found} | {text} | {fix} |" for test, found, text, fix in BUGS]
    parts += ["", "The adversarial reviews of the correctness issues (the findings, their "
              "regression tests and fixes) are in [reviews.md](reviews.md).", "",
              METHODS, NOTES, ISOLATION]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=os.path.join(REPO, "bench-out", "reliability.json"))
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "reliability.md"))
    args = ap.parse_args(argv)
    try:
        with open(args.results) as fh:
            results = json.load(fh)
    except (OSError, ValueError) as exc:
        print(f"report: cannot read {args.results}: {exc}", file=sys.stderr)
        return 1
    text = render(results)
    with open(args.out, "w") as fh:
        fh.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench CASE [...]``: run benchmark cases and write ``docs/benchmarks.md``.

Cases: ``save``, ``restore``, ``codec``, ``rebuild``, ``memory``, ``frameworks`` (the Hugging
Face Trainer and Lightning examples: no snapshotd, a snapshot every step, the framework's own
checkpoint every step), ``all``; ``smoke`` runs every
case on tiny sizes (the test suite does, so the suite cannot rot). Every figure is reported next
to its baseline measured in the same run, as a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import psutil

from . import report

MIB = 1 << 20
SIZES: dict[str, list[Any]] = {
    "save": [64 * MIB, 256 * MIB, 1024 * MIB], "restore": [64 * MIB, 256 * MIB, 1024 * MIB],
    "codec": [256 * MIB], "rebuild": [256 * MIB], "memory": [256 * MIB],
    "scaling": [[64 * MIB, 256 * MIB, 1024 * MIB, 2048 * MIB, 4096 * MIB]],
    "training": [200], "training1": [200], "training1c": [200],
    "fsdp1": [200], "fsdp1c": [200], "frameworks": [100],
    "dlrover": [[64 * MIB, 256 * MIB, 1024 * MIB]],
    "savecpu": [9]}
#: ``--quick``: the issue-15 rows (restore, CPU per save) at sizes that run in about a minute.
QUICK: dict[str, list[Any]] = {"restore": [64 * MIB, 256 * MIB], "savecpu": [9]}
#: ``--full``: adds 4 GiB to the restore row where memory allows (state, its copy, the
#: daemon's version and torch.load's copy: about 5x the state).
FULL_EXTRA: dict[str, list[Any]] = {"restore": [4096 * MIB]}
SMOKE: dict[str, list[Any]] = {
    "save": [4 * MIB], "restore": [4 * MIB], "codec": [8 * MIB], "rebuild": [4 * MIB],
    "memory": [4 * MIB], "scaling": [[2 * MIB, 4 * MIB]], "training": [12], "savecpu": [1]}
#: ``training1`` is ``training`` with one rank pinned to a core, ``training1c`` its copy thread
#: on the daemon's core; ``fsdp1`` / ``fsdp1c`` the same for the sharded example (FSDP2, DCP
#: state dicts). ``make bench`` runs them all.


def machine() -> str:
    return (f"{platform.node()}: {psutil.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / (1 << 30):.0f} GiB RAM, {platform.machine()}, "
            f"Linux {platform.release()}, Python {platform.python_version()}")


def run_case(name: str, size: Any, repeats: int) -> Any:
    if name == "save":
        from .node import save_case
        return save_case(size, repeats)
    if name == "restore":
        from .node import restore_case
        return restore_case(size, repeats)
    if name == "memory":
        from .node import memory_case
        return memory_case(size)
    if name == "rebuild":
        from .cluster import rebuild_case
        return rebuild_case(size, max(1, repeats // 2))
    if name == "codec":
        from .codec import run
        return run(size, repeats)
    if name == "scaling":
        from .node import scaling_case
        return scaling_case(size, max(1, repeats // 2))
    if name == "training":
        from .training import training_case
        return training_case(size, repeats=2 if size > 50 else 1,
                             size="small" if size > 50 else "tiny")
    if name == "training1":       # one trainer on one core, the daemon on another
        from .training import training_case
        return training_case(size, repeats=2 if size > 50 else 1, nproc=1,
                             size="small" if size > 50 else "tiny", daemon_core=True)
    if name == "training1c":      # the same, the trainer's copy thread on the daemon's core
        from .training import training_case
        return training_case(size, repeats=2 if size > 50 else 1, nproc=1,
                             size="small" if size > 50 else "tiny", daemon_core=True,
                             copy_on_daemon_core=True)
    if name in ("fsdp1", "fsdp1c"):  # the sharded example (FSDP2, DCP state dicts), as training1(c)
        from .training import training_case
        return training_case(size, repeats=2 if size > 50 else 1, nproc=1,
                             size="small" if size > 50 else "tiny", daemon_core=True,
                             copy_on_daemon_core=name == "fsdp1c", script="train_fsdp.py",
                             script_args=("--state-dicts", "dcp"))
    if name == "frameworks":      # the HF Trainer and Lightning examples, three ways each
        from .frameworks import frameworks_case
        return frameworks_case(size, repeats=2 if size > 50 else 1)
    if name == "savecpu":
        from .savecpu import savecpu_case
        return savecpu_case(saves=40 if size > 1 else 5, repeats=max(1, repeats),
                            layers=size)
    if name == "dlrover":
        from .dlrover import run as dlrover_run
        return dlrover_run(size, repeats)
    raise SystemExit(f"unknown case {name!r}; choose from {sorted(SIZES)} or all/smoke")


def _label(size: Any) -> str:
    if isinstance(size, list):
        return ",".join(_label(s) for s in size)
    return f"{size // MIB} MiB" if size >= MIB else f"{size}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("cases", nargs="+", help="save restore codec rebuild memory | all | smoke")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true",
                    help="smaller sizes for the restore and CPU-per-save rows")
    ap.add_argument("--full", action="store_true",
                    help="also the 4 GiB restore (needs about 5x that in free memory)")
    ap.add_argument("--out", default="bench-out", help="directory for the JSON results")
    ap.add_argument("--doc", default="docs/benchmarks.md", help="markdown report ('' for none)")
    args = ap.parse_args(argv)
    smoke = args.cases == ["smoke"]
    names = (list(SMOKE) if smoke else list(SIZES)) if args.cases in (["all"], ["smoke"]) \
        else args.cases
    sizes = SMOKE if smoke else dict(SIZES)
    if args.quick and not smoke:
        sizes.update(QUICK)
    if args.full and not smoke:
        free = psutil.virtual_memory().available
        for name, extra in FULL_EXTRA.items():
            fits = [s for s in extra if 5 * s < free]
            if len(fits) < len(extra):
                print(f"bench: {name}: skipping {[_label(s) for s in extra if s not in fits]}"
                      f" ({free >> 30} GiB available)", file=sys.stderr)
            sizes[name] = sizes[name] + fits
    repeats = 2 if smoke else args.repeats
    results: dict[str, Any] = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M"),
                               "cases": {}}
    for name in names:
        for size in sizes[name]:
            started = time.perf_counter()
            print(f"bench: {name} {_label(size)} ...", file=sys.stderr, flush=True)
            results["cases"].setdefault(name, []).append(run_case(name, size, repeats))
            print(f"bench: {name} {_label(size)} done in {time.perf_counter() - started:.1f}s",
                  file=sys.stderr, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    text = report.render(results)
    print(text)
    if args.doc and not smoke:
        report.write(results, args.doc, args.out)
        report.plots(results, os.path.join(os.path.dirname(args.doc), "img"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

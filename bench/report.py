"""Render benchmark results as markdown tables of ratios against same-run baselines."""

from __future__ import annotations

import json
import os
import re
from typing import Any

__all__ = ["render", "write"]

MIB = 1 << 20


def _mib(n: float) -> str:
    return f"{n / MIB:.0f} MiB" if n < 1 << 30 else f"{n / (1 << 30):.1f} GiB"


def _s(d: Any) -> str:
    if isinstance(d, dict):
        return f"{d['median'] * 1e3:.1f} ms ({d['min'] * 1e3:.1f}–{d['max'] * 1e3:.1f})"
    return f"{d * 1e3:.1f} ms"


def _med(d: Any) -> float:
    return d["median"] if isinstance(d, dict) else float(d)


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _save(rows: list[dict]) -> list[str]:
    out = ["## Save stall and ingest", "",
           "Stall: how long `save()` blocks the calling thread, with the tensors copied in the "
           "background (what `protect()` and `TrainingState` give parameters and optimizer "
           "state). *Bare save()*: the default `copy=\"auto\"` with nothing protected copies "
           "every tensor at `save()` (into the slot the last commit reserved). Ingest: "
           "`save()` until the daemon committed (copy into daemon memory, checksums, manifest), "
           "against one single-core numpy `copyto` of the same bytes.", "",
           "| state | stall | memcpy (torch) | stall / memcpy (≤ 5%) | bare save() | "
           "torch.save /dev/shm | torch.save / stall (≥ 20x) | torch.save disk | DCP save | "
           "DCP async_save blocking |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = _med(r["stall"]) / _med(r["memcpy_torch"])
        speed = _med(r["torch_save_shm"]) / _med(r["stall"])
        dcp = r.get("dcp", {})
        auto = (f"{_s(r['stall_auto'])}, {_med(r['stall_auto']) / _med(r['memcpy_torch']):.2f}x "
                "memcpy" if "stall_auto" in r else "-")
        out.append(f"| {_mib(r['bytes'])} | {_s(r['stall'])} | {_s(r['memcpy_torch'])} | "
                   f"{ratio:.2%} ({_verdict(ratio <= 0.05)}) | {auto} | "
                   f"{_s(r['torch_save_shm'])} | "
                   f"{speed:.0f}x ({_verdict(speed >= 20)}) | {_s(r['torch_save_disk'])} | "
                   f"{_s(dcp['save']) if 'save' in dcp else dcp.get('error', '-')} | "
                   f"{_s(dcp['async_save_blocking']) if 'async_save_blocking' in dcp else '-'} |")
    out += ["", "Ingest is `save()` until the bytes are in daemon memory (`wait_copied()`: the "
            "Alloc round trip and the copy, what the design's ingest target measures); "
            "committed adds the daemon's XXH3 checksums of every tensor and the manifest "
            "write.", "",
            "| state | until copied | GB/s | numpy copyto 1 core | GB/s | ingest ratio (≥ 0.8x) "
            "| until committed | GB/s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        total, base = _med(r["total"]), _med(r["memcpy_numpy_1core"])
        copied = _med(r["copied"]) if "copied" in r else total
        out.append(f"| {_mib(r['bytes'])} | {_s(r.get('copied', r['total']))} | "
                   f"{r['bytes'] / copied / 1e9:.2f} | {_s(r['memcpy_numpy_1core'])} | "
                   f"{r['bytes'] / base / 1e9:.2f} | "
                   f"{base / copied:.2f}x ({_verdict(base / copied >= 0.8)}) | "
                   f"{_s(r['total'])} | {r['bytes'] / total / 1e9:.2f} |")
    return out


def _restore(rows: list[dict]) -> list[str]:
    out = ["## Local restore", "",
           "`restore()` into freshly allocated tensors against allocating and copying the same "
           "tensors (memcpy fresh) and `torch.load` from `/dev/shm` (the page cache); "
           "`restore(into=...)` against a memcpy into the same existing tensors (memcpy warm). "
           "Every restore is the whole call: `Open` (the daemon verifies every checksum), the "
           "timeline's `Drop`, mapping and copying.", "",
           "| state | restore | memcpy fresh | ratio (≥ 0.5x) | torch.load /dev/shm | "
           "speedup (≥ 5x) | restore into= | memcpy warm | ratio (≥ 0.8x) | torch.load disk "
           "| bit-exact |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        t = _med(r["restore"])
        ratio = _med(r["memcpy_fresh"]) / t
        speed = _med(r["torch_load_shm"]) / t
        line = (f"| {_mib(r['bytes'])} | {_s(r['restore'])} | {_s(r['memcpy_fresh'])} | "
                f"{ratio:.2f}x ({_verdict(ratio >= 0.5)}) | {_s(r['torch_load_shm'])} | "
                f"{speed:.1f}x ({_verdict(speed >= 5)}) | ")
        if "restore_into" in r:
            into = _med(r["memcpy_torch"]) / _med(r["restore_into"])
            line += (f"{_s(r['restore_into'])} | {_s(r['memcpy_torch'])} | "
                     f"{into:.2f}x ({_verdict(into >= 0.8)}) | ")
        else:
            line += f"- | {_s(r['memcpy_torch'])} | - | "
        out.append(line + f"{_s(r['torch_load_disk'])} | {r.get('bit_exact', '-')} |")
    broken = [r for r in rows if r.get("breakdown")]
    if broken:
        out += ["", "Where a restore's time goes (medians over every restore of the row): `Open` "
                "is the round trip in which the daemon verifies the checksum of every tensor "
                "(by several threads) before handing out the lease; *map* maps the segment "
                "and makes the tensor views (fresh tensors: nothing is copied); *map + copy* "
                "fills the `into=` tensors from the mapping; `Release` returns the lease "
                "(in the background for mapped tensors). Verification reads every byte once, "
                "as fast as memory allows: it is the floor of a restore that verifies first.",
                "", "| state | Open (verify) | verify GB/s | map | map + copy (into=) | Drop | "
                "Release |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in broken:
            b = r["breakdown"]

            def ms(key: str, b: dict = b) -> str:
                return f"{b[key] * 1e3:.1f} ms" if key in b else "-"
            gbps = r["bytes"] / b["open"] / 1e9 if b.get("open") else 0
            out.append(f"| {_mib(r['bytes'])} | {ms('open')} | {gbps:.1f} | {ms('map')} | "
                       f"{ms('map_and_copy')} | {ms('drop')} | {ms('release')} |")
    return out


def _savecpu(rows: list[dict]) -> list[str]:
    out = ["## CPU per save", "",
           "A GPT-like model (embeddings, transformer blocks, head) with AdamW saved through "
           "`TrainingState` every step, waiting for each commit: process CPU time of the "
           "trainer (every thread) plus the daemon, per save, against the CPU of copying the "
           "state's tensors once (`copy_` into preallocated memory, same run; "
           "`OMP_NUM_THREADS=1`). Target: at most 3x the copy + 3 ms.", "",
           "| tensors | state | trainer CPU | daemon CPU | total (min–max) | copy once | "
           "target | total / target |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = r["total_cpu"] / r["target_cpu"]
        out.append(f"| {r['tensors']} | {_mib(r['bytes'])} | {r['trainer_cpu'] * 1e3:.1f} ms | "
                   f"{r['daemon_cpu'] * 1e3:.1f} ms | {r['total_cpu'] * 1e3:.1f} ms "
                   f"({r['total_min'] * 1e3:.1f}–{r['total_max'] * 1e3:.1f}) | "
                   f"{r['copy_cpu'] * 1e3:.1f} ms | {r['target_cpu'] * 1e3:.1f} ms | "
                   f"{ratio:.2f} ({_verdict(ratio <= 1)}) |")
    return out


def _codec(runs: list[list[dict]]) -> list[str]:
    out = ["## Erasure coding", "", "Single thread, GB/s of data bytes; ratio to raw pyeclib "
           "(`ECDriver(ec_type='isa_l_rs_vand')`) on the same 1 MiB units (target ≥ 0.8x).", "",
           "| implementation | code | operation | GB/s | vs raw pyeclib | note |",
           "| --- | --- | --- | --- | --- | --- |"]
    for rows in runs:
        for r in rows:
            ratio = f"{r['vs_pyeclib']:.2f}x" if r.get("vs_pyeclib") else "-"
            out.append(f"| {r['impl']} | RS({r['k']},{r['m']}) | {r['op']} | {r['gbps']:.4g} | "
                       f"{ratio} | {r['note']} |")
    return out


def _rebuild(rows: list[dict]) -> list[str]:
    out = ["## Node rebuild and network", "",
           "One node's data rebuilt from five peers (k=4, m=2, CURVE on). Decoding reads k "
           "fragments per stripe, so k·S bytes cross the network; the baseline streams those "
           "same bytes over one raw ZeroMQ TCP connection on loopback (target ≥ 0.7x).", "",
           "| S | rebuild | replace → restored | bytes fetched | raw ZeroMQ + CURVE | ratio | "
           "raw ZeroMQ plain | sent per node per version | (1 + (m-1)/k)·S |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = _med(r["zmq_stream_curve"]) / _med(r["rebuild"])
        out.append(f"| {_mib(r['bytes'])} | {_s(r['rebuild'])} | {_s(r['replace_to_restored'])} "
                   f"| {_mib(r['fetched_bytes'])} | {_s(r['zmq_stream_curve'])} | "
                   f"{ratio:.2f}x ({_verdict(ratio >= 0.7)}) | {_s(r['zmq_stream_plain'])} | "
                   f"{_mib(r['sent_per_node'])} | {_mib(r['expected_sent_per_node'])} |")
    return out


def _memory(rows: list[dict]) -> list[str]:
    out = ["## Memory", "", "One node (m=0), `--keep 1`: peak shared memory while saving "
           "repeatedly, and the daemon's private RSS.", "",
           "| S | peak shared memory | daemon private RSS | target S + 64 MiB |",
           "| --- | --- | --- | --- |"]
    for r in rows:
        target = r["bytes"] + 64 * MIB
        out.append(f"| {_mib(r['bytes'])} | {_mib(r['shm_peak'])} | "
                   f"{_mib(r['daemon_private_rss'])} | {_mib(target)} "
                   f"({_verdict(r['shm_peak'] + r['daemon_private_rss'] <= target)}) |")
    return out


def _scaling(rows: list[dict]) -> list[str]:
    out = ["## Scaling", "", "Medians per state size; the fit is least squares over all sizes "
           "(intercept, seconds per GiB, worst relative deviation of a point from the line).", "",
           "| state | save stall | save until committed | restore |", "| --- | --- | --- | --- |"]
    for r in rows:
        for pt in r["points"]:
            out.append(f"| {_mib(pt['bytes'])} | {_s(pt['stall'])} | {_s(pt['total'])} | "
                       f"{_s(pt['restore'])} |")
        out += ["", "| quantity | intercept | per GiB | worst deviation |",
                "| --- | --- | --- | --- |"]
        for key, fit in r["fit"].items():
            out.append(f"| {key} | {fit['intercept_s'] * 1e3:.1f} ms | "
                       f"{fit['seconds_per_gib'] * 1e3:.1f} ms | {fit['worst_deviation']:.0%} |")
    return out


def _training(rows: list[dict]) -> list[str]:
    out = ["## Training overhead", "", "`examples/train.py` (DDP) and `examples/train_fsdp.py "
           "--state-dicts dcp` (FSDP2: parameters and AdamW moments as DTensors) under torchrun "
           "on this machine, a snapshot of model, optimizer, scheduler, RNG and data position "
           "every step, against the same run without snapshots, alternating (target: at most 3% "
           "slower, with one core left to the daemon: the shape of a real node; the "
           "2-ranks-on-2-cores row shares every core between trainers and daemon).", "",
           "| run | ranks | cores | model | steps/s with snapshots | steps/s without | "
           "slowdown |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        a, b = _med(r["steps_per_s_snapshot"]), _med(r["steps_per_s_none"])
        slow = 1 - a / b
        cores = (f"{r['nproc']} + 1 for the daemon" if r.get("daemon_core")
                 else "shared (2 cores)")
        if r.get("copy_on_daemon_core"):
            cores += " and the copy thread (the default)"
        elif r.get("daemon_core"):
            cores += ", the copy thread on the trainer's (`SNAPSHOTD_COPY_CPUS=any`)"
        script = r.get("script", "train.py")
        verdict = (_verdict(slow <= 0.03) if r.get("daemon_core")
                   else "no core left to the daemon: reported beside")
        out.append(f"| {script}, {r['steps']} steps | {r['nproc']} | {cores} | {r['size']} | "
                   f"{a:.2f} ({r['steps_per_s_snapshot']['min']:.2f}–"
                   f"{r['steps_per_s_snapshot']['max']:.2f}) | {b:.2f} "
                   f"({r['steps_per_s_none']['min']:.2f}–{r['steps_per_s_none']['max']:.2f}) | "
                   f"{slow:.1%} ({verdict}) |")
    return out


def _frameworks(runs: list[list[dict]]) -> list[str]:
    out = ["## Training overhead, frameworks", "",
           "Issue 26: `examples/train_hf.py` (the Hugging Face Trainer, a tiny GPT-2) and "
           "`examples/train_lightning.py` (Lightning, a small MLP) under torchrun, 2 ranks "
           "(DDP on gloo) sharing this machine's cores with the daemon, three ways, "
           "alternating: without snapshotd, with `SnapshotdCallback` snapshotting every step, "
           "and with the framework's own checkpoint every step into `/dev/shm` (Trainer "
           "`save_strategy=\"steps\", save_steps=1, save_total_limit=1`; Lightning "
           "`ModelCheckpoint(every_n_train_steps=1)`, the newest kept). Steps/s of rank 0 "
           "after a warm-up of a fifth of the steps; the ratios are step time against the "
           "run without snapshotd (1.00x: no slowdown).", "",
           "| framework | steps | ranks | steps/s without | steps/s snapshot every step | "
           "step time vs without | steps/s own checkpoint every step | step time vs without | "
           "snapshot step time vs own checkpoint's |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    names = {"hf": "Hugging Face Trainer", "lightning": "Lightning"}

    def col(d: dict) -> str:
        return f"{d['median']:.2f} ({d['min']:.2f}–{d['max']:.2f})"
    for rows in runs:
        for r in rows:
            none, snap = _med(r["steps_per_s_none"]), _med(r["steps_per_s_snapshot"])
            own = _med(r["steps_per_s_framework"])
            out.append(f"| {names.get(r['framework'], r['framework'])} (`{r['script']}`) | "
                       f"{r['steps']} × {r.get('repeats', 1)} | {r['nproc']} | "
                       f"{col(r['steps_per_s_none'])} | {col(r['steps_per_s_snapshot'])} | "
                       f"{none / snap:.2f}x | {col(r['steps_per_s_framework'])} | "
                       f"{none / own:.2f}x | {own / snap:.2f}x |")
    return out


def _dlrover(rows: list[dict]) -> list[str]:
    out = ["## DLRover Flash Checkpoint", ""]
    for r in rows:
        if "error" in r:
            out.append(f"Not measured: {r['error']}")
            continue
        out += ["| state | Flash Checkpoint save-to-memory stall | memcpy | ratio |",
                "| --- | --- | --- | --- |"]
        for pt in r.get("sizes", []):
            if "error" in pt:
                out.append(f"| {_mib(pt.get('bytes', 0))} | {pt['error']} | | |")
                continue
            out.append(f"| {_mib(pt['bytes'])} | {_s(pt['stall'])} | {_s(pt['memcpy_torch'])} "
                       f"| {_med(pt['stall']) / _med(pt['memcpy_torch']):.2f}x |")
    return out


def plots(results: dict[str, Any], directory: str) -> list[str]:
    """PNG plots of the scaling and save-stall cases; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    written = []
    for r in results["cases"].get("scaling", []):
        xs = [pt["bytes"] / (1 << 30) for pt in r["points"]]
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in (("stall", "save() stall"), ("total", "save until committed"),
                           ("restore", "restore()")):
            ax.plot(xs, [pt[key] for pt in r["points"]], marker="o", label=label)
        ax.set_xlabel("state size (GiB)")
        ax.set_ylabel("seconds")
        ax.set_title("snapshotd scaling (this machine)")
        ax.legend()
        path = os.path.join(directory, "scaling.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    rows = results["cases"].get("save", [])
    if rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        labels = [_mib(r["bytes"]) for r in rows]
        series = [("snapshotd save() stall", lambda r: _med(r["stall"])),
                  ("memcpy", lambda r: _med(r["memcpy_torch"])),
                  ("torch.save /dev/shm", lambda r: _med(r["torch_save_shm"])),
                  ("DCP async_save blocking", lambda r: r["dcp"].get("async_save_blocking", 0))]
        width = 0.2
        for i, (label, fn) in enumerate(series):
            ax.bar([j + i * width for j in range(len(rows))], [fn(r) for r in rows], width,
                   label=label)
        ax.set_xticks([j + 1.5 * width for j in range(len(rows))], labels)
        ax.set_yscale("log")
        ax.set_ylabel("seconds the training thread is blocked (log)")
        ax.legend(fontsize=8)
        path = os.path.join(directory, "save_stall.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def render(results: dict[str, Any]) -> str:
    cases = results["cases"]
    parts = [f"Machine: {results['machine']}. Measured {results['when']}; absolute times are "
             "specific to this machine, ratios are against baselines from the same run.", ""]
    training = cases.get("training1", []) + cases.get("training1c", []) + \
        cases.get("training", []) + cases.get("fsdp1", []) + cases.get("fsdp1c", [])
    for name, fn in (("save", _save), ("restore", _restore), ("savecpu", _savecpu),
                     ("codec", _codec),
                     ("rebuild", _rebuild), ("memory", _memory), ("scaling", _scaling),
                     ("training", _training), ("frameworks", _frameworks),
                     ("dlrover", _dlrover)):
        if name == "training" and training:
            parts += fn(training) + [""]
        elif name in cases:
            parts += fn(cases[name]) + [""]
    return "\n".join(parts)


def write(results: dict[str, Any], doc: str, out_dir: str) -> None:
    """Merge with earlier results of other cases and write the markdown document."""
    merged_path = os.path.join(out_dir, "merged.json")
    merged = {"cases": {}}
    if os.path.exists(merged_path):
        with open(merged_path) as fh:
            merged = json.load(fh)
    merged["cases"].update(results["cases"])
    merged["machine"], merged["when"] = results["machine"], results["when"]
    with open(merged_path, "w") as fh:
        json.dump(merged, fh, indent=1, default=str)
    intro = ("# Benchmarks\n\nRegenerated by `make bench` (`python -m bench all --full`: each case "
             "merged into bench-out/merged.json, so a case run alone replaces only its own "
             "rows; the date below is the last run's); single cases "
             "with `python -m bench save|restore|codec|rebuild|memory|frameworks`. Targets are "
             "docs/design.md "
             "section 8; a missed target is marked **missed**, with the reason in the notes.\n\n")
    notes_path = os.path.join(os.path.dirname(doc), "benchmarks-notes.md")
    notes = open(notes_path).read() if os.path.exists(notes_path) else ""
    previous = open(doc).read() if os.path.exists(doc) else ""
    kept = standalone_sections(previous)
    with open(doc, "w") as fh:
        fh.write(intro + keep_unmeasured(render(merged), previous) + "\n" + kept + notes)


#: The order of the suite's sections on the page (render's order).
ORDER = ["Save stall and ingest", "Local restore", "CPU per save", "Erasure coding",
         "Node rebuild and network", "Memory", "Scaling", "Training overhead",
         "Training overhead, frameworks", "DLRover Flash Checkpoint"]


def keep_unmeasured(rendered: str, previous: str) -> str:
    """``rendered`` with the suite sections of the previous page that no result in
    bench-out/merged.json renders kept as they were (a fresh clone has no merged.json: a case
    run alone then still replaces only its own rows), in the suite's order."""
    head, *parts = re.split(r"(?m)^(?=## )", rendered)
    new = {p.split("\n", 1)[0][3:]: p.rstrip("\n") + "\n\n" for p in parts}
    old = {}
    for part in re.split(r"(?m)^(?=## )", previous):
        title = part.split("\n", 1)[0][3:]
        if part.startswith("## ") and title in ORDER and title not in new:
            old[title] = part.rstrip("\n") + "\n\n"
    sections = {**old, **new}
    order = sorted(sections, key=lambda t: ORDER.index(t) if t in ORDER else len(ORDER))
    return (head + "".join(sections[t] for t in order)).rstrip("\n") + "\n"


def standalone_sections(text: str) -> str:
    """The sections of ``text`` written from standalone benchmarks or the demo (their heading
    names the command, ``python -m bench.<name>`` or ``make demo``): kept as they are when the
    suite rewrites the page."""
    out = []
    for part in re.split(r"(?m)^(?=## )", text):
        heading = part.split("\n", 1)[0]
        if part.startswith("## ") and ("`python -m bench." in heading
                                       or "`make demo`" in heading):
            out.append(part.rstrip("\n") + "\n\n")
    return "".join(out)

"""What the demo shows: one :class:`Failure` per injected fault (what was killed, when the
job resumed, from which step), the summary table, the loss plot and the progress line."""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .torchrun import TorchrunJob, resumed_record

__all__ = ["Failure", "summary_table", "plot_loss", "Progress"]


@dataclass
class Failure:
    """One injected failure and how the job got over it."""

    kind: str
    slot: int
    injected_at: float            # wall time of the kill
    step: int | None           # newest step logged before the kill
    detected_at: float | None = None
    restored: list[Any] | None = None
    resumed_at: float | None = None
    rebuilt: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: Where the time to resume went (see resume_breakdown); None without the trainer's times.
    breakdown: dict[str, float] | None = None

    @property
    def restored_step(self) -> int | None:
        values = set(self.restored or [])
        return values.pop() if len(values) == 1 else None

    @property
    def steps_lost(self) -> int | None:
        if self.step is None or not self.restored:
            return None
        restored = self.restored_step
        return self.step - (restored if restored is not None else -1)

    def fill(self, losses: list[dict[str, Any]], starts: list[dict[str, Any]],
             job: TorchrunJob) -> None:
        """Find when the job noticed, what it restored and when it trained again."""
        self.detected_at = job.first_failure_after(self.injected_at)
        before = [r for r in losses if r["time"] <= self.injected_at]
        if before:                  # every step the killed process completed, even in flight
            pid = before[-1].get("pid")
            self.step = max(r["step"] for r in losses if r.get("pid") == pid)
        first = resumed_record(losses, self.injected_at)
        if first is not None:
            self.resumed_at = first["time"]
        if self.resumed_at is not None:
            latest: dict[int, Any] = {}
            for ev in starts:
                if self.injected_at < ev["time"] <= self.resumed_at:
                    latest[ev["rank"]] = ev["restored"]
            self.restored = [latest[r] for r in sorted(latest)]
            new = [ev for ev in starts if self.injected_at < ev["time"] <= self.resumed_at]
            self.breakdown = resume_breakdown(self.injected_at, self.detected_at, new,
                                              self.resumed_at)


#: The phases of a restart, in order (what each ends with; see resume_breakdown).
PHASES = ("detection", "torchrun restart", "process start + imports", "process group",
          "model set-up", "restore agreement", "restore", "first step")
#: The phases that are snapshotd's own.
OURS = ("restore agreement", "restore")


def resume_breakdown(killed: float, detected: float | None, starts: list[dict[str, Any]],
                     resumed: float) -> dict[str, float] | None:
    """Seconds per phase from a kill to the first step completed after the restore.

    ``starts`` are the ``start`` events of the restarted ranks (examples/train.py logs the wall
    times its process started, had imported, had its process group and had built the model,
    and the seconds its restore waited, agreed and loaded). A phase ends when the *last* rank
    finishes it (the job steps only then), so the phases add up to the whole time.

    >>> ev = {"t_process": 12.0, "t_imported": 14.0, "t_group": 15.0, "t_built": 15.5,
    ...       "restore_parts": {"wait": 0.0, "agree": 0.1, "load": 0.2}, "time": 15.8}
    >>> resume_breakdown(10.0, 11.0, [ev], 16.0)["process start + imports"]
    2.0
    """
    if detected is None or not starts or any(ev.get("t_process") is None for ev in starts):
        return None
    try:
        ends = [detected,
                max(ev["t_process"] for ev in starts),
                max(ev["t_imported"] for ev in starts),
                max(ev["t_group"] for ev in starts),
                max(ev["t_built"] for ev in starts),
                max(ev["t_built"] + ev["restore_parts"].get("wait", 0.0)
                    + ev["restore_parts"].get("agree", 0.0) for ev in starts),
                max(ev["time"] for ev in starts),
                resumed]
    except (KeyError, TypeError, AttributeError):
        return None
    out, last = {}, killed
    for phase, end in zip(PHASES, ends):
        end = max(end, last)       # clocks of one machine; a phase never ends before the last
        out[phase] = round(end - last, 3)
        last = end
    return out


def breakdown_line(f: Failure) -> str:
    """One line: the phases of ``f``'s restart and snapshotd's share of the whole."""
    if not f.breakdown:
        return f"  {f.kind}: no breakdown (the trainer logged no start times)"
    total = sum(f.breakdown.values())
    ours = sum(f.breakdown[p] for p in OURS)
    parts = ", ".join(f"{p} {s:.2f}s" for p, s in f.breakdown.items())
    return (f"  {f.kind}: {parts}; total {total:.1f}s, snapshotd's part (agreement + restore) "
            f"{ours:.2f}s = {100 * ours / total if total else 0:.1f}%")


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def summary_table(failures: list[Failure], t0: float) -> str:
    head = ["failure", "injected", "detected at", "restored step", "steps lost",
            "s to resume", "rebuilt from peers"]
    rows = []
    for f in failures:
        detected = (f"{f.detected_at - t0:.1f}s (+{f.detected_at - f.injected_at:.2f}s)"
                    if f.detected_at else "n/a")
        restored = f.restored_step
        if restored is None and f.restored:
            restored_s = "DISAGREE " + ",".join(map(str, f.restored))
        elif restored is None:
            restored_s = "none (fresh start)" if f.restored else "n/a"
        else:
            restored_s = str(restored)
        rows.append([
            f.kind, f"{f.injected_at - t0:.1f}s / step {f.step}", detected, restored_s,
            "n/a" if f.steps_lost is None else str(f.steps_lost),
            f"{f.resumed_at - f.injected_at:.1f}" if f.resumed_at else "n/a",
            _fmt_bytes(f.rebuilt) + (f" {f.note}" if f.note else "")])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def plot_loss(path: Path, reference: list[dict], faulted: list[dict],
              failures: list[Failure], t0: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7.5))
    if reference:
        ax1.plot([r["step"] for r in reference], [r["loss"] for r in reference], color="0.6",
                 lw=3, label="uninterrupted reference")
    attempts: dict[int, list[dict]] = {}
    segment, last_pid = -1, None
    for r in faulted:                       # one segment per trainer process (restart)
        if r.get("pid") != last_pid or segment < 0:
            segment += 1
            last_pid = r.get("pid")
        attempts.setdefault(segment, []).append(r)
    for i, recs in attempts.items():
        ranks = f" ({recs[0]['world']} ranks)" if "world" in recs[0] else ""
        ax1.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=1.2,
                 label=("with failures" if i == 0 else f"after failure {i}") + ranks)
        ax2.plot([r["time"] - t0 for r in recs], [r["step"] for r in recs], lw=1.5)
    colors = ["tab:red", "tab:purple", "tab:brown", "tab:olive"]
    for i, f in enumerate(failures):
        c = colors[i % len(colors)]
        if f.step is not None:
            ax1.axvline(f.step, color=c, ls="--", lw=1)
            restored = "nothing" if f.restored_step is None else f"step {f.restored_step}"
            ax1.annotate(f"{f.kind}\nrestored {restored}", (f.step, 1), xycoords=(
                "data", "axes fraction"), xytext=(4, -4), textcoords="offset points",
                va="top", fontsize=8, color=c)
        ax2.axvline(f.injected_at - t0, color=c, ls="--", lw=1)
        if f.resumed_at:
            ax2.axvspan(f.injected_at - t0, f.resumed_at - t0, color=c, alpha=0.15)
        ax2.annotate(f.kind, (f.injected_at - t0, 0.02), xycoords=("data", "axes fraction"),
                     xytext=(4, 2), textcoords="offset points", fontsize=8, color=c)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (rank 0)")
    ax1.set_title("snapshotd demo: training loss, failures marked (grey: uninterrupted run)")
    ax1.legend(loc="lower left", fontsize=8)
    ax2.set_xlim(left=0)
    ax2.set_xlabel("seconds since the torchrun agents started")
    ax2.set_ylabel("step")
    ax2.set_title("progress; shaded: from the kill to the first step after the restore")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- progress


class Progress:
    """One updating status line on a terminal, plain lines (at most every few s) otherwise."""

    def __init__(self, stream: Any = None, every: float = 3.0) -> None:
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = every
        self._last = 0.0
        self._width = 0

    def update(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            cols = shutil.get_terminal_size((120, 20)).columns - 1
            text = text[:cols]
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
            self.stream.flush()
        elif force or now - self._last >= self.every:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last = now

    def say(self, text: str) -> None:
        """A permanent line (an event), above the status line."""
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()


# ----------------------------------------------------------------------------- main

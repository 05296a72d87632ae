"""Erasure-codec throughput: snapshotd's IsalCodec against raw pyeclib, zfec and reedsolo.

All implementations run on the same random data in the same process. GB/s counts data bytes
(k fragments) per second, single thread, median of the repeats. Ours works in place on 1 MiB
stripe units (one call per unit) and, for encode, also as one call over S/k-byte fragments;
raw pyeclib (``ECDriver(k, m, ec_type="isa_l_rs_vand")``) gets the same 1 MiB units as bytes.
reedsolo runs on a small sample and its rate is extrapolated (labelled in the table).

Raw pyeclib allocates fresh fragment buffers on every call, so its numbers depend on the C
allocator: with glibc's defaults each ~1 MiB buffer is mmap'ed and page-faulted, which dominates
its encode. Compare runs with ``MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824``
to see the allocator cost taken out.

Run::

    python bench/codec.py --size-mib 64 --json bench-out/codec.json

or from Python::

    >>> from bench.codec import run
    >>> rows = run(8 << 20, repeats=1)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

try:
    from snapshotd.cluster.codec import UNIT, Codec, make_codec
except ImportError:  # a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from snapshotd.cluster.codec import UNIT, Codec, make_codec

__all__ = ["CONFIGS", "format_table", "main", "run"]

CONFIGS = [(4, 2), (8, 2)]
LOSSES = {1: (0,), 2: (0, 1)}
REEDSOLO_SAMPLE = 64 << 10
FALLBACK_SAMPLE = 8 << 20
BASELINE = "pyeclib isa_l_rs_vand (raw)"


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: page faults in fresh buffers, table caches
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _row(impl: str, op: str, k: int, m: int, nbytes: int, seconds: float, note: str = "") -> dict:
    return {"impl": impl, "op": op, "k": k, "m": m, "data_bytes": nbytes, "seconds": seconds,
            "gbps": nbytes / seconds / 1e9 if seconds > 0 else float("inf"), "note": note}


def _units(blob: bytes, k: int) -> list[list[memoryview]]:
    """The k data fragments of each 1 MiB-unit stripe, as views into `blob`."""
    view, per = memoryview(blob), k * UNIT
    return [[view[s + i * UNIT : s + (i + 1) * UNIT] for i in range(k)]
            for s in range(0, len(blob) - per + 1, per)]


def _ours(blob: bytes, k: int, m: int, repeats: int) -> list[dict]:
    codec, stripes = make_codec("isal", k, m), _units(blob, k)
    parity = [[memoryview(bytearray(UNIT)) for _ in range(m)] for _ in stripes]
    nbytes, impl = len(stripes) * k * UNIT, "snapshotd isal"

    def encode() -> None:
        for data, par in zip(stripes, parity):
            codec.encode(data, par)

    rows = [_row(impl, "encode", k, m, nbytes, _median_seconds(encode, repeats), "1 MiB units")]
    for lost in LOSSES.values():
        rows.append(_ours_reconstruct(codec, stripes, parity, lost, repeats))
    rows.append(_ours_whole(codec, blob[:nbytes], repeats))
    return rows


def _ours_reconstruct(codec: Codec, stripes: list[list[memoryview]],
                      parity: list[list[memoryview]], lost: tuple[int, ...], repeats: int) -> dict:
    k, jobs = codec.k, []
    for data, par in zip(stripes, parity):
        present = {i: f for i, f in enumerate(list(data) + list(par)) if i not in lost}
        jobs.append((present, {i: bytearray(UNIT) for i in lost}))

    def reconstruct() -> None:
        for present, missing in jobs:
            codec.reconstruct(present, missing)

    seconds = _median_seconds(reconstruct, repeats)
    if any(bytes(stripes[0][i]) != jobs[0][1][i] for i in lost):
        raise AssertionError("IsalCodec reconstructed wrong bytes")
    return _row("snapshotd isal", f"reconstruct {len(lost)} lost", k, codec.m,
                len(stripes) * k * UNIT, seconds, "1 MiB units")


def _ours_whole(codec: Codec, blob: bytes, repeats: int) -> dict:
    size = len(blob) // codec.k
    data = [memoryview(blob)[i * size : (i + 1) * size] for i in range(codec.k)]
    parity = [bytearray(size) for _ in range(codec.m)]
    seconds = _median_seconds(lambda: codec.encode(data, parity), repeats)
    return _row("snapshotd isal", "encode", codec.k, codec.m, size * codec.k, seconds,
                f"1 call, {size >> 20} MiB fragments")


def _pyeclib(blob: bytes, k: int, m: int, repeats: int) -> list[dict]:
    from pyeclib.ec_iface import ECDriver

    driver, per = ECDriver(k=k, m=m, ec_type="isa_l_rs_vand"), k * UNIT
    payloads = [blob[s : s + per] for s in range(0, len(blob) - per + 1, per)]
    nbytes = len(payloads) * per
    rows = [_row(BASELINE, "encode", k, m, nbytes,
                 _median_seconds(lambda: [driver.encode(p) for p in payloads], repeats),
                 "1 MiB units")]
    fragments = [driver.encode(p) for p in payloads]
    for lost in LOSSES.values():
        seconds = _median_seconds(_pyeclib_reconstruct(driver, fragments, lost), repeats)
        rows.append(_row(BASELINE, f"reconstruct {len(lost)} lost", k, m, nbytes, seconds,
                         "1 MiB units"))
    return rows


def _pyeclib_reconstruct(driver: Any, fragments: list[list[bytes]],
                         lost: tuple[int, ...]) -> Callable[[], object]:
    avail = [[f for i, f in enumerate(frags) if i not in lost] for frags in fragments]
    return lambda: [driver.reconstruct(a, list(lost)) for a in avail]


def _zfec(blob: bytes, k: int, m: int, repeats: int) -> list[dict]:
    if importlib.util.find_spec("zfec") is None:
        return []
    import zfec

    encoder, stripes, wanted = zfec.Encoder(k, k + m), _units(blob, k), list(range(k, k + m))
    seconds = _median_seconds(lambda: [encoder.encode(s, wanted) for s in stripes], repeats)
    return [_row("zfec", "encode", k, m, len(stripes) * k * UNIT, seconds, "1 MiB units")]


def _reedsolo(blob: bytes, k: int, m: int) -> list[dict]:
    if importlib.util.find_spec("reedsolo") is None:
        return []
    import reedsolo

    rs, count = reedsolo.RSCodec(m), REEDSOLO_SAMPLE // k
    words = [bytearray(blob[i * k : (i + 1) * k]) for i in range(count)]
    seconds = _median_seconds(lambda: [rs.encode(w) for w in words], 1)
    rows = [_row("reedsolo (raw, per codeword)", "encode", k, m, count * k, seconds,
                 f"{REEDSOLO_SAMPLE >> 10} KiB sample, extrapolated")]
    logging.getLogger("snapshotd.codec").setLevel(logging.ERROR)
    codec, size = make_codec("reedsolo", k, m), FALLBACK_SAMPLE // k
    data = [memoryview(blob)[i * size : (i + 1) * size] for i in range(k)]
    parity = [bytearray(size) for _ in range(m)]
    seconds = _median_seconds(lambda: codec.encode(data, parity), 1)
    rows.append(_row("snapshotd reedsolo fallback", "encode", k, m, size * k, seconds,
                     f"{FALLBACK_SAMPLE >> 20} MiB sample, extrapolated"))
    return rows


def run(size_bytes: int, repeats: int) -> list[dict]:
    """Measure every implementation on `size_bytes` of random data; one dict per measurement."""
    if size_bytes < max(k for k, _ in CONFIGS) * UNIT:
        raise ValueError(f"size_bytes must be at least {max(k for k, _ in CONFIGS)} MiB")
    blob = os.urandom(size_bytes)
    rows: list[dict] = []
    for k, m in CONFIGS:
        rows += _ours(blob, k, m, repeats) + _pyeclib(blob, k, m, repeats)
        rows += _zfec(blob, k, m, repeats) + _reedsolo(blob, k, m)
    baseline = {(r["k"], r["m"], r["op"]): r["gbps"] for r in rows if r["impl"] == BASELINE}
    for r in rows:
        base = baseline.get((r["k"], r["m"], r["op"]))
        r["vs_pyeclib"] = r["gbps"] / base if base else None
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table of `run`'s rows."""
    head = (f"{'implementation':<30} {'code':<8} {'operation':<18} {'GB/s':>9} "
            f"{'vs pyeclib':>10}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = f"{r['vs_pyeclib']:.2f}x" if r["vs_pyeclib"] is not None else "-"
        gbps = f"{r['gbps']:.4f}" if r["gbps"] < 0.1 else f"{r['gbps']:.2f}"
        lines.append(f"{r['impl']:<30} RS({r['k']},{r['m']})  {r['op']:<18} {gbps:>9} "
                     f"{ratio:>10}  {r['note']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256, help="data size (default 256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = run(args.size_mib << 20, args.repeats)
    sys.stdout.write(format_table(rows) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"size_bytes": args.size_mib << 20, "repeats": args.repeats, "rows": rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

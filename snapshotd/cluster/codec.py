"""Erasure codecs: k data fragments + m parity fragments over GF(2^8) (docs/design.md section 4).

Two implementations behind one seam:

* ``IsalCodec`` ("isal", the default): ISA-L called through ctypes on the library that the pyeclib
  wheel bundles, writing straight into the caller's buffers in units of about 1 MiB.
* ``ReedsoloCodec`` ("reedsolo"): a pure-Python fallback built on the ``reedsolo`` package.

The two codecs use different generator matrices, so fragments must be decoded by the codec that
encoded them. Fragment indices are 0..k-1 for data and k..k+m-1 for parity. Zero-length fragments
are valid and encode/reconstruct as no-ops.

Example::

    >>> codec = make_codec("isal", 4, 2)
    >>> data = [bytes([i]) * 1000 for i in range(4)]
    >>> parity = [bytearray(1000) for _ in range(2)]
    >>> codec.encode(data, parity)
    >>> lost = {0: bytearray(1000), 4: bytearray(1000)}
    >>> codec.reconstruct({1: data[1], 2: data[2], 3: data[3], 5: parity[1]}, lost)
    >>> lost[0] == data[0] and lost[4] == parity[0]
    True
"""

from __future__ import annotations

import abc
import ctypes
import ctypes.util
import glob
import importlib
import importlib.util
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from typing_extensions import Buffer
else:
    Buffer = Any

__all__ = ["CODECS", "Buffer", "Codec", "CodecError", "IsalCodec", "ReedsoloCodec", "make_codec"]

log = logging.getLogger("snapshotd.codec")

UNIT = 1 << 20  # bytes of each fragment processed per pass, so the working set stays in cache

_GF_SIZE = 255


class CodecError(ValueError):
    """A codec cannot be built or a call's arguments are wrong; the message says what."""


def _gf_tables() -> tuple[list[int], list[int]]:
    """exp/log tables of GF(2^8) with polynomial 0x11d, the field of both ISA-L and reedsolo."""
    exp = [1]
    for _ in range(509):
        exp.append((exp[-1] << 1) ^ (0x11D if exp[-1] & 0x80 else 0))
    return exp, [exp[:255].index(x) if x else 0 for x in range(256)]


_EXP, _LOG = _gf_tables()


def _gf_mul(a: int, b: int) -> int:
    return 0 if a == 0 or b == 0 else _EXP[_LOG[a] + _LOG[b]]


def _gf_row_times(row: Sequence[int], mat: Sequence[Sequence[int]]) -> list[int]:
    """Row vector times matrix over GF(2^8)."""
    out = [0] * len(mat[0])
    for coef, mrow in zip(row, mat):
        if coef:
            for j, v in enumerate(mrow):
                out[j] ^= _gf_mul(coef, v)
    return out


def _nbytes(obj: Buffer, what: str, writable: bool) -> int:
    try:
        with memoryview(obj) as mv:
            if not mv.c_contiguous:
                raise CodecError(f"{what} is not a contiguous buffer")
            if writable and mv.readonly:
                raise CodecError(f"{what} is read-only ({type(obj).__name__}); it must be writable")
            return mv.nbytes
    except TypeError as exc:
        raise CodecError(f"{what} is not a buffer ({type(obj).__name__})") from exc


def _bytes_view(obj: Buffer) -> memoryview:
    return memoryview(obj).cast("B")


class _PyBuffer(ctypes.Structure):
    """CPython's Py_buffer (part of the stable ABI since 3.11)."""

    _fields_ = [
        ("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
        ("format", ctypes.c_void_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer  # a PyDLL: a failure raises its exception
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes, _release_buffer.restype = [ctypes.POINTER(_PyBuffer)], None


@contextmanager
def _addresses(objs: Sequence[Buffer], writable: bool) -> Iterator[list[tuple[int, int]]]:
    """Pin each buffer through the buffer protocol and yield its (base address, length).

    PyObject_GetBuffer works for read-only exporters too (bytes, read-only memoryview or mmap),
    where ctypes' from_buffer would refuse, so no input is ever copied. The exports are held until
    the block ends, so no buffer can be resized or freed while ISA-L uses its address.
    """
    views: list[_PyBuffer] = []
    flags = 1 if writable else 0  # PyBUF_WRITABLE or PyBUF_SIMPLE (C-contiguous bytes)
    try:
        for obj in objs:
            view = _PyBuffer()
            _get_buffer(obj, ctypes.byref(view), flags)
            views.append(view)
        yield [(view.buf or 0, view.len) for view in views]
    finally:
        for view in views:
            _release_buffer(ctypes.byref(view))


class Codec(abc.ABC):
    """Systematic erasure code: k data fragments + m parity fragments, all the same length.

    Fragment indices: 0..k-1 data, k..k+m-1 parity.
    """

    name: ClassVar[str]
    k: int
    m: int

    def __init__(self, k: int, m: int) -> None:
        if not (isinstance(k, int) and isinstance(m, int) and k >= 1 and 0 <= m <= _GF_SIZE - k):
            raise CodecError(f"invalid k={k!r}, m={m!r}: need integers k >= 1, m >= 0 and "
                             f"k + m <= {_GF_SIZE} (GF(2^8))")
        self.k, self.m = k, m

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k}, m={self.m})"

    @abc.abstractmethod
    def encode(self, data: Sequence[Buffer], parity: Sequence[Buffer]) -> None:
        """Fill the m writable `parity` buffers (each len L) from the k `data` buffers (each len L).

        In place, no large temporary copies.
        """

    @abc.abstractmethod
    def reconstruct(self, present: Mapping[int, Buffer], missing: Mapping[int, Buffer]) -> None:
        """Given >= k present fragments (index -> readable buffer of len L), fill each writable
        buffer in `missing` (index -> buffer of len L) with that fragment's bytes (data or parity).
        """

    def _check_encode(self, data: Sequence[Buffer], parity: Sequence[Buffer]) -> int:
        """Validate an encode call; return the common fragment length."""
        if len(data) != self.k or len(parity) != self.m:
            raise CodecError(f"{self!r}.encode needs {self.k} data and {self.m} parity buffers, "
                             f"got {len(data)} data and {len(parity)} parity")
        return _common_length(
            _sizes("data", enumerate(data), False) | _sizes("parity", enumerate(parity), True)
        )

    def _check_reconstruct(
        self, present: Mapping[int, Buffer], missing: Mapping[int, Buffer]
    ) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
        """Validate a reconstruct call; return (length, k present indices to use, missing ones)."""
        n = self.k + self.m
        for idx in list(present) + list(missing):
            if not isinstance(idx, int) or not 0 <= idx < n:
                raise CodecError(f"fragment index {idx!r} out of range 0..{n - 1} for {self!r}")
        both = sorted(set(present) & set(missing))
        if both:
            raise CodecError(f"fragments {both} are given both as present and as missing")
        if len(present) < self.k:
            raise CodecError(f"too few fragments to reconstruct: {len(present)} present "
                             f"{sorted(present)}, need at least k={self.k} of k+m={n}")
        sizes = _sizes("present", present.items(), False) | _sizes("missing", missing.items(), True)
        return _common_length(sizes), tuple(sorted(present)[: self.k]), tuple(sorted(missing))


def _sizes(kind: str, items: Iterable[tuple[int, Buffer]], writable: bool) -> dict[str, int]:
    return {f"{kind}[{i}]": _nbytes(buf, f"{kind}[{i}]", writable) for i, buf in items}


def _common_length(sizes: Mapping[str, int]) -> int:
    lengths = set(sizes.values())
    if len(lengths) > 1:
        detail = ", ".join(f"{name}={size}" for name, size in sizes.items())
        raise CodecError(f"fragments must all have the same length, got {detail}")
    return lengths.pop() if lengths else 0


def _isal_candidates() -> list[str]:
    found: list[str] = []
    spec = importlib.util.find_spec("pyeclib")
    for pkg_dir in (spec.submodule_search_locations or []) if spec else []:
        site = os.path.dirname(pkg_dir)
        for pattern in ("pyeclib.libs/libisal*.so*", "pyeclib/.dylibs/libisal*.dylib"):
            found.extend(sorted(glob.glob(os.path.join(site, pattern))))
    system = ctypes.util.find_library("isal")
    return found + ([system] if system else [])


@cache
def _isal() -> ctypes.CDLL:
    """Load ISA-L once and declare the functions used (CDLL calls release the GIL)."""
    for path in _isal_candidates():
        try:
            lib = ctypes.CDLL(path)
            break
        except OSError as exc:
            log.debug("cannot load ISA-L from %s: %s", path, exc)
    else:
        raise CodecError(
            "ISA-L library not found: install pyeclib (pip install pyeclib), whose wheel bundles "
            "libisal, or a system libisal; or use codec 'reedsolo'"
        )
    ptr, num, ptrs = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)
    for fname, restype, argtypes in (
        ("gf_gen_cauchy1_matrix", None, [ptr, num, num]),
        ("gf_invert_matrix", num, [ptr, ptr, num]),
        ("ec_init_tables", None, [num, num, ptr, ptr]),
        ("ec_encode_data", None, [num, num, num, ptr, ptrs, ptrs]),
    ):
        func = getattr(lib, fname)
        func.restype, func.argtypes = restype, argtypes
    return lib


@cache
def _cauchy_rows(k: int, m: int) -> tuple[tuple[int, ...], ...]:
    """The (k+m) x k systematic Cauchy generator: identity on top, any k rows invertible."""
    n = k + m
    mat = (ctypes.c_ubyte * (n * k))()
    _isal().gf_gen_cauchy1_matrix(ctypes.addressof(mat), n, k)
    return tuple(tuple(mat[r * k : (r + 1) * k]) for r in range(n))


def _init_tables(k: int, rows: Sequence[Sequence[int]]) -> ctypes.Array[ctypes.c_ubyte]:
    coeffs = (ctypes.c_ubyte * (k * len(rows)))(*[v for row in rows for v in row])
    tables = (ctypes.c_ubyte * (32 * k * len(rows)))()
    _isal().ec_init_tables(k, len(rows), ctypes.addressof(coeffs), ctypes.addressof(tables))
    return tables


@lru_cache(maxsize=64)
def _encode_tables(k: int, m: int) -> ctypes.Array[ctypes.c_ubyte]:
    return _init_tables(k, _cauchy_rows(k, m)[k:])


@lru_cache(maxsize=1024)
def _decode_tables(
    k: int, m: int, chosen: tuple[int, ...], missing: tuple[int, ...]
) -> ctypes.Array[ctypes.c_ubyte]:
    """Tables mapping the k `chosen` fragments to the `missing` ones (data or parity)."""
    rows = _cauchy_rows(k, m)
    sub = (ctypes.c_ubyte * (k * k))(*[v for i in chosen for v in rows[i]])
    inv = (ctypes.c_ubyte * (k * k))()
    if _isal().gf_invert_matrix(ctypes.addressof(sub), ctypes.addressof(inv), k) != 0:
        raise CodecError(f"singular decode matrix for fragments {chosen} (k={k}, m={m})")
    inverse = [inv[r * k : (r + 1) * k] for r in range(k)]
    return _init_tables(k, [_gf_row_times(rows[f], inverse) for f in missing])


def _isal_run(length: int, tables: ctypes.Array[ctypes.c_ubyte],
              src: Sequence[Buffer], dst: Sequence[Buffer]) -> None:
    """dst = tables x src, one UNIT-sized slice of every buffer per ISA-L call."""
    lib, tbl = _isal(), ctypes.addressof(tables)
    srcp, dstp = (ctypes.c_void_p * len(src))(), (ctypes.c_void_p * len(dst))()
    with _addresses(src, writable=False) as sa, _addresses(dst, writable=True) as da:
        if any(size != length for _, size in sa + da):
            raise CodecError("a fragment buffer was resized during the call")
        for off in range(0, length, UNIT):
            step = min(UNIT, length - off)
            srcp[:] = [addr + off for addr, _ in sa]
            dstp[:] = [addr + off for addr, _ in da]
            lib.ec_encode_data(step, len(src), len(dst), tbl, srcp, dstp)


class IsalCodec(Codec):
    """Reed-Solomon (systematic Cauchy matrix) from ISA-L, zero-copy on the caller's buffers."""

    name: ClassVar[str] = "isal"

    def __init__(self, k: int, m: int) -> None:
        super().__init__(k, m)
        _cauchy_rows(k, m)

    def encode(self, data: Sequence[Buffer], parity: Sequence[Buffer]) -> None:
        length = self._check_encode(data, parity)
        if length and self.m:
            _isal_run(length, _encode_tables(self.k, self.m), data, parity)

    def reconstruct(self, present: Mapping[int, Buffer], missing: Mapping[int, Buffer]) -> None:
        length, chosen, lost = self._check_reconstruct(present, missing)
        if length and lost:
            tables = _decode_tables(self.k, self.m, chosen, lost)
            _isal_run(length, tables, [present[i] for i in chosen], [missing[i] for i in lost])


@cache
def _mul_table(coef: int) -> bytes:
    """bytes.translate table for multiplication by `coef` in GF(2^8)."""
    return bytes(_gf_mul(coef, x) for x in range(256))


def _dot_into(
    out: Sequence[memoryview], rows: Sequence[Sequence[int]], src: Sequence[memoryview]
) -> None:
    """out[r] = sum_j rows[r][j] * src[j], vectorised with bytes.translate and big-int XOR."""
    length = len(src[0]) if src else 0
    for off in range(0, length, UNIT):
        pieces = [bytes(s[off : off + UNIT]) for s in src]
        step = len(pieces[0])
        for r, row in enumerate(rows):
            acc = 0
            for coef, piece in zip(row, pieces):
                if coef:
                    acc ^= int.from_bytes(piece.translate(_mul_table(coef)), "little")
            out[r][off : off + step] = acc.to_bytes(step, "little")


class ReedsoloCodec(Codec):
    """Pure-Python fallback using the code of the ``reedsolo`` package, applied across fragments.

    For byte position i the codeword is (d_0[i], ..., d_{k-1}[i], p_0[i], ..., p_{m-1}[i]), a
    codeword of ``reedsolo.RSCodec(m)``. The code is linear, so reedsolo erasure-decodes unit
    vectors once per (present, missing) pattern to get the coefficient matrix (parity from data
    for encode); the bytes are then combined with bytes.translate and big-integer XOR, which
    copies each ~1 MiB unit a few times.
    """

    name: ClassVar[str] = "reedsolo"

    def __init__(self, k: int, m: int) -> None:
        super().__init__(k, m)
        try:
            self._rs = importlib.import_module("reedsolo")
        except ImportError as exc:
            raise CodecError("codec 'reedsolo' needs the package: pip install reedsolo") from exc
        self._rsc: Any = self._rs.RSCodec(m, nsize=_GF_SIZE) if m else None
        self._rows: dict[tuple[tuple[int, ...], tuple[int, ...]], list[list[int]]] = {}
        log.warning("codec 'reedsolo' is a slow pure-Python fallback (RS(%d,%d)), many times "
                    "slower than 'isal'; install pyeclib for the ISA-L codec", k, m)

    def _codeword(self, word: bytearray, erase: list[int]) -> bytearray:
        try:
            return bytearray(self._rsc.decode(word, erase_pos=erase, only_erasures=True)[1])
        except self._rs.ReedSolomonError as exc:
            raise CodecError(f"reedsolo could not decode erasures {erase}: {exc}") from exc

    def _matrix(self, chosen: tuple[int, ...], lost: tuple[int, ...]) -> list[list[int]]:
        """Rows R with fragment lost[r] = sum_j R[r][j] * fragment chosen[j] (erasure-decoding
        the unit vectors). With chosen = the data fragments this is the generator's parity part."""
        key = (chosen, lost)
        if key not in self._rows:
            n = self.k + self.m
            erase = [i for i in range(n) if i not in chosen]
            cols = [self._codeword(bytearray(int(i == p) for i in range(n)), erase) for p in chosen]
            self._rows[key] = [[col[f] for col in cols] for f in lost]
        return self._rows[key]

    def encode(self, data: Sequence[Buffer], parity: Sequence[Buffer]) -> None:
        if self._check_encode(data, parity) and self.m:
            rows = self._matrix(tuple(range(self.k)), tuple(range(self.k, self.k + self.m)))
            _dot_into([_bytes_view(p) for p in parity], rows, [_bytes_view(d) for d in data])

    def reconstruct(self, present: Mapping[int, Buffer], missing: Mapping[int, Buffer]) -> None:
        length, chosen, lost = self._check_reconstruct(present, missing)
        if length and lost:
            rows = self._matrix(chosen, lost)
            _dot_into([_bytes_view(missing[i]) for i in lost], rows,
                      [_bytes_view(present[i]) for i in chosen])


class ReplicateCodec(Codec):
    """The replication policy as a codec: k = 1 and every "parity" fragment is a full copy."""

    name = "replicate"

    def __init__(self, k: int, m: int) -> None:
        if k != 1:
            raise CodecError(f"replicate keeps m full copies and needs k=1, got k={k}")
        super().__init__(k, m)

    def encode(self, data: Sequence[Buffer], parity: Sequence[Buffer]) -> None:
        self._check_encode(data, parity)
        for out in parity:
            memoryview(out).cast("B")[:] = memoryview(data[0]).cast("B")

    def reconstruct(self, present: Mapping[int, Buffer], missing: Mapping[int, Buffer]) -> None:
        _, chosen, lost = self._check_reconstruct(present, missing)
        for index in lost:
            memoryview(missing[index]).cast("B")[:] = memoryview(present[chosen[0]]).cast("B")


CODECS: dict[str, type[Codec]] = {IsalCodec.name: IsalCodec, ReedsoloCodec.name: ReedsoloCodec,
                                  ReplicateCodec.name: ReplicateCodec}


def make_codec(name: str, k: int, m: int) -> Codec:
    """Build the codec called `name` ("isal", "reedsolo" or "replicate") for (k, m)."""
    if name not in CODECS:
        raise CodecError(f"unknown codec {name!r}; known codecs: {', '.join(sorted(CODECS))}")
    return CODECS[name](k, m)


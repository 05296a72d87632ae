"""One contract suite for every codec in snapshotd.cluster.codec.CODECS.

Run with ``python -m pytest -q tests/unit/test_codec_contract.py``.
"""

from __future__ import annotations

import importlib.util
import itertools
import mmap
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapshotd.cluster.codec import CODECS, UNIT, Codec, CodecError, make_codec

pytestmark = pytest.mark.timeout(60)

# Pure-Python codecs get small shapes only; every codec gets at least the default ones.
DEFAULT_CONFIGS = [(4, 2), (2, 1), (3, 3)]
CONFIGS = {"isal": DEFAULT_CONFIGS + [(8, 2), (10, 4)]}
SIZES = {"isal": [1, 31, 4099], "reedsolo": [1, 1031]}
DEFAULT_SIZES = [1, 1031]

# "replicate" is the k=1 case (m full copies); it runs the loss suite below with k=1 and its
# own checks at the end of this file; the RS codecs run everything.
RS_CODECS = sorted(n for n in CODECS if n != "replicate")
CONFIGS["replicate"] = [(1, 1), (1, 2), (1, 3)]

SHAPES = [
    (name, k, m, size)
    for name in sorted(CODECS)
    for k, m in CONFIGS.get(name, DEFAULT_CONFIGS)
    for size in SIZES.get(name, DEFAULT_SIZES)
]


def fragments(k: int, size: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed * 1000 + k * 7 + size)
    return [rng.randbytes(size) for _ in range(k)]


def encoded(codec: Codec, data: list[bytes]) -> list[bytes]:
    """All k+m fragments: the data, then freshly encoded parity."""
    size = len(data[0]) if data else 0
    parity = [bytearray(size) for _ in range(codec.m)]
    codec.encode(data, parity)
    return list(data) + [bytes(p) for p in parity]


def check_loss(codec: Codec, frags: list[bytes], lost: tuple[int, ...]) -> None:
    present = {i: f for i, f in enumerate(frags) if i not in lost}
    missing = {i: bytearray(len(frags[i])) for i in lost}
    codec.reconstruct(present, missing)
    for i in lost:
        assert missing[i] == frags[i], f"{codec!r}: fragment {i} wrong after losing {lost}"


def loss_sets(n: int, m: int) -> list[tuple[int, ...]]:
    return [c for j in range(1, m + 1) for c in itertools.combinations(range(n), j)]


@pytest.mark.parametrize("name,k,m,size", SHAPES)
def test_every_loss_set_up_to_m_reconstructs(name: str, k: int, m: int, size: int) -> None:
    codec = make_codec(name, k, m)
    frags = encoded(codec, fragments(k, size))
    for lost in loss_sets(k + m, m):
        check_loss(codec, frags, lost)


@pytest.mark.parametrize("k,m", [(4, 2), (8, 2)])
def test_isal_fragments_spanning_several_units(k: int, m: int) -> None:
    codec = make_codec("isal", k, m)
    size = 3 * UNIT + 5
    frags = encoded(codec, fragments(k, size, seed=1))
    for lost in loss_sets(k + m, m):
        check_loss(codec, frags, lost)


def test_isal_units_are_independent() -> None:
    """Encoding a long fragment in one call equals encoding each 1 MiB unit on its own."""
    codec = make_codec("isal", 4, 2)
    data = fragments(4, 2 * UNIT + 77, seed=2)
    whole = encoded(codec, data)[4:]
    for off in range(0, len(data[0]), UNIT):
        piece = encoded(codec, [d[off : off + UNIT] for d in data])[4:]
        assert piece == [p[off : off + UNIT] for p in whole]


@pytest.mark.parametrize("name", RS_CODECS)
def test_encode_is_deterministic(name: str) -> None:
    data = fragments(3, 1031, seed=3)
    first = encoded(make_codec(name, 3, 2), data)
    assert encoded(make_codec(name, 3, 2), data) == first
    codec = make_codec(name, 3, 2)
    assert encoded(codec, data) == encoded(codec, data) == first


@pytest.mark.parametrize("name", RS_CODECS)
def test_zero_length_fragments_are_a_no_op(name: str) -> None:
    codec = make_codec(name, 4, 2)
    frags = encoded(codec, [b""] * 4)
    assert frags == [b""] * 6
    check_loss(codec, frags, (0, 5))


@pytest.mark.parametrize("name", RS_CODECS)
def test_too_few_fragments_raise(name: str) -> None:
    codec = make_codec(name, 4, 2)
    frags = encoded(codec, fragments(4, 64))
    present = {i: frags[i] for i in (1, 2, 5)}
    with pytest.raises(CodecError, match="too few fragments.*need at least k=4"):
        codec.reconstruct(present, {0: bytearray(64)})


@pytest.mark.parametrize("name", RS_CODECS)
def test_unequal_lengths_raise(name: str) -> None:
    codec = make_codec(name, 2, 1)
    with pytest.raises(CodecError, match=r"same length.*data\[1\]=9"):
        codec.encode([b"x" * 10, b"y" * 9], [bytearray(10)])
    with pytest.raises(CodecError, match=r"same length.*parity\[0\]=11"):
        codec.encode([b"x" * 10, b"y" * 10], [bytearray(11)])
    with pytest.raises(CodecError, match=r"same length.*missing\[2\]=3"):
        codec.reconstruct({0: b"x" * 10, 1: b"y" * 10}, {2: bytearray(3)})


@pytest.mark.parametrize("name", RS_CODECS)
def test_bad_calls_name_the_problem(name: str) -> None:
    codec = make_codec(name, 2, 1)
    with pytest.raises(CodecError, match="needs 2 data and 1 parity"):
        codec.encode([b"ab"], [bytearray(2)])
    with pytest.raises(CodecError, match=r"parity\[0\] is read-only"):
        codec.encode([b"ab", b"cd"], [b"ef"])
    with pytest.raises(CodecError, match=r"parity\[0\] is not a contiguous buffer"):
        codec.encode([b"ab", b"cd"], [memoryview(bytearray(4))[::2]])
    with pytest.raises(CodecError, match=r"data\[0\] is not a buffer"):
        codec.encode(["ab", b"cd"], [bytearray(2)])  # type: ignore[list-item]
    with pytest.raises(CodecError, match="index 3 out of range 0..2"):
        codec.reconstruct({0: b"ab", 3: b"cd"}, {1: bytearray(2)})
    with pytest.raises(CodecError, match=r"both as present and as missing"):
        codec.reconstruct({0: b"ab", 1: b"cd"}, {1: bytearray(2)})
    with pytest.raises(CodecError, match=r"missing\[2\] is read-only"):
        codec.reconstruct({0: b"ab", 1: b"cd"}, {2: b"ef"})


@pytest.mark.parametrize("name", RS_CODECS)
@pytest.mark.parametrize("k,m", [(0, 2), (2, -1), (200, 56), (2.0, 1)])
def test_bad_parameters_raise(name: str, k: int, m: int) -> None:
    with pytest.raises(CodecError, match="k >= 1, m >= 0 and k \\+ m <= 255"):
        make_codec(name, k, m)


def test_unknown_codec_lists_the_known_ones() -> None:
    with pytest.raises(CodecError, match="unknown codec 'zstd'; known codecs: isal, reedsolo"):
        make_codec("zstd", 4, 2)


@pytest.mark.parametrize("name", RS_CODECS)
def test_no_parity_codec(name: str) -> None:
    codec = make_codec(name, 3, 0)
    data = fragments(3, 100)
    assert encoded(codec, data) == data
    codec.reconstruct(dict(enumerate(data)), {})
    with pytest.raises(CodecError, match="too few"):
        codec.reconstruct({0: data[0], 1: data[1]}, {2: bytearray(100)})


def _input_kinds(frag: bytes) -> list[Any]:
    arr = np.frombuffer(bytearray(frag), dtype=np.uint8)
    return [
        frag,
        bytearray(frag),
        memoryview(frag),
        memoryview(b"pad" + frag)[3:],
        arr,
        arr.view(np.float32) if len(frag) % 4 == 0 else arr,
    ]


OUTPUT_KINDS: dict[str, Callable[[int], Any]] = {
    "bytearray": bytearray,
    "numpy": lambda size: np.zeros(size, dtype=np.uint8),
    "mmap": lambda size: mmap.mmap(-1, size),
    "memoryview slice": lambda size: memoryview(bytearray(size + 8))[4:-4],
}


def _as_bytes(buf: Any) -> bytes:
    return bytes(memoryview(buf).cast("B"))


@pytest.mark.parametrize("name", RS_CODECS)
@pytest.mark.parametrize("out_kind", sorted(OUTPUT_KINDS))
def test_any_contiguous_buffer_kind_works(name: str, out_kind: str) -> None:
    codec, size, new = make_codec(name, 2, 2), 1024, OUTPUT_KINDS[out_kind]
    frags = encoded(codec, fragments(2, size, seed=4))
    for src0, src1 in zip(_input_kinds(frags[0]), _input_kinds(frags[1])):
        parity = [new(size), new(size)]
        codec.encode([src0, src1], parity)
        assert [_as_bytes(p) for p in parity] == frags[2:], type(src0)
        lost = new(size)
        codec.reconstruct({1: src1, 2: frags[2]}, {0: lost})
        assert _as_bytes(lost) == frags[0], type(src0)


@pytest.mark.skipif(importlib.util.find_spec("reedsolo") is None, reason="reedsolo not installed")
def test_reedsolo_codewords_are_reedsolo_codewords() -> None:
    import reedsolo

    codec, rs = make_codec("reedsolo", 4, 2), reedsolo.RSCodec(2)
    frags = encoded(codec, fragments(4, 64, seed=5))
    for i in range(64):
        column = bytes(f[i] for f in frags)
        assert bytes(rs.encode(bytearray(column[:4]))) == column


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_isal_random_data_and_losses(data: st.DataObject) -> None:
    k = data.draw(st.integers(1, 12), label="k")
    m = data.draw(st.integers(0, 4), label="m")
    size = data.draw(st.integers(0, 3000), label="size")
    frags = [data.draw(st.binary(min_size=size, max_size=size)) for _ in range(k)]
    lost = data.draw(st.sets(st.integers(0, k + m - 1), max_size=m), label="lost")
    codec = make_codec("isal", k, m)
    check_loss(codec, encoded(codec, frags), tuple(sorted(lost)))


def test_replicate_copies_and_rebuilds_from_any_survivor() -> None:
    codec = make_codec("replicate", 1, 3)
    frags = encoded(codec, fragments(1, 4099))
    assert frags[1:] == [frags[0]] * 3
    for lost in loss_sets(4, 3):
        check_loss(codec, frags, lost)
    with pytest.raises(CodecError, match="needs k=1"):
        make_codec("replicate", 2, 1)

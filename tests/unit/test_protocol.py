"""The control protocol: round trips, and every kind of bad frame named in its error."""

import json

import pytest

from snapshotd.common import protocol as p

pytestmark = pytest.mark.timeout(30)

ENTRY = p.TensorEntry("w", "float32", (2, 3), 0, 24)


@pytest.mark.parametrize("msg", [
    p.Alloc("job", 1, 7, 4096, 99),
    p.Commit(3, (ENTRY,), '{"a": 1}'),
    p.Abort(3), p.ListVersions("job"), p.ListVersions("job", 2),
    p.Open("job", 0, 5, None, 9, False), p.Release(4), p.Status(),
    p.Drop("job", None, None, 3), p.Error("x", "y"), p.Ok(2),
    p.AllocReply(1, "/dev/shm/x", 10),
    p.OpenReply(1, "j", 0, 5, "/p", 24, (ENTRY,), "{}", "memory"),
    p.ListReply((p.VersionInfo("j", 0, 1, 10, "local", 1.5),)),
    p.Commit(3, (), "{}", "abc"), p.Open("job", 0, 5, map=True),
    p.OpenReply(1, "j", 0, 5, "/p", 24, (ENTRY,) * 3, "{}", "disk", 2),
    p.ListReply((p.VersionInfo("j", 3, 1, 10, "protected", 1.5, 4),)),
    p.Open("job", 2, 5, 7, map=True, remote=True), p.Where("job", "tok"),
    p.WhereReply((p.NodeHolding(1, (2, 3), (4, 5), 4), p.NodeHolding(2, (), ()))),
])
def test_round_trip(msg):
    req_id, back = p.decode(p.encode(msg, req_id=42))
    assert req_id == 42
    assert back == msg


@pytest.mark.parametrize("frame, code, needle", [
    (b"\x00\xff garbage", "malformed", "not a JSON object"),
    (b"[1, 2]", "malformed", "not a JSON object"),
    (b'{"v": 99, "op": "status"}', "bad_version", "99"),
    (b'{"op": "status"}', "bad_version", "None"),
    (b'{"v": 1, "op": "fly"}', "unknown_op", "unknown operation"),
    (b'{"v": 1, "op": "abort"}', "malformed", "missing field 'slot'"),
    (b'{"v": 1, "op": "abort", "slot": "3"}', "malformed", "abort.slot must be int"),
    (b'{"v": 1, "op": "abort", "slot": true}', "malformed", "abort.slot must be int"),
    (b'{"v": 1, "op": "abort", "slot": 1, "x": 2}', "malformed", "unexpected fields ['x']"),
    (b'{"v": 1, "op": "commit", "slot": 1, "meta": "", "tensors": [{"name": 1}]}',
     "malformed", "commit.tensors[0].name must be str"),
    (b'{"v": 1, "op": "status", "id": "x"}', "malformed", "'id'"),
])
def test_bad_frames_are_named(frame, code, needle):
    with pytest.raises(p.ProtocolError) as err:
        p.decode(frame)
    assert err.value.code == code
    assert needle in str(err.value)


def test_oversized_frame_refused_before_parsing():
    with pytest.raises(p.ProtocolError, match="too_large"):
        p.decode(b" " * 101, max_bytes=100)


def test_encode_is_plain_json():
    body = json.loads(p.encode(p.Alloc("j", 0, 1, 2, 3), 5))
    assert body == {"v": p.PROTOCOL_VERSION, "op": "alloc", "id": 5, "job": "j", "rank": 0,
                    "step": 1, "nbytes": 2, "pid": 3, "local_world_size": 1, "token": "",
                    "world_size": 0, "run": ""}


def _t(name, dtype="float32", shape=(4,), offset=0, nbytes=16):
    return p.TensorEntry(name, dtype, shape, offset, nbytes)


def test_check_table_accepts_a_valid_layout():
    p.check_table((_t("a"), _t("b", offset=64), _t("c", "bool", (0,), 128, 0)), 192)


@pytest.mark.parametrize("table, size, needle", [
    ((_t("a"), _t("a", offset=64)), 128, "'a' appears twice"),
    ((_t("a", dtype="float128"),), 64, "unknown dtype"),
    ((_t("a", nbytes=15),), 64, "is 16 bytes, table says 15"),
    ((_t("a", offset=60),), 128, "not an aligned range"),
    ((_t("a", offset=64),), 70, "not an aligned range inside the 70-byte slot"),
    ((_t("a", shape=(-4,), nbytes=-16),), 64, "negative dimension"),
    ((_t("a", shape=(32,), nbytes=128), _t("b", offset=64)), 256, "'a' and 'b' overlap"),
])
def test_check_table_names_the_bad_tensor(table, size, needle):
    with pytest.raises(p.ProtocolError, match="bad_table") as err:
        p.check_table(table, size)
    assert needle in str(err.value)

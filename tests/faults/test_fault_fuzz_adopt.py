"""Fuzz what a daemon adopts from its shm directory at start (issue 25, findings 5, 6, 8, 9).

A daemon's directory on tmpfs (/dev/shm) is made once by a real Store and Protector: versions of
two ranks at three steps, parity of the stripes this node holds, floors.json. Each example
copies it, damages one file in one field and starts on the copy the way the daemon starts
(``Store.open``, ``Protector``: parity and floors adopted, retention, the scrub), then asks what
the daemon's requests ask (Status/ListVersions as encoded on the wire, Inventory, housekeeping's
expiry). Damage: any JSON field of a manifest, a parity description or floors.json replaced by
a value of another type, removed, or an unknown one added, and the record sealed again (only the
types are wrong: the typed decoding must refuse it, or take it harmlessly); a field's value
changed, a bit flipped, the file emptied or cut short, without sealing again (the checksum must
refuse it); a segment cut short; parity bytes flipped (the scrub must find exactly that record).
``SNAPSHOTD_FAULT_RUNS=long``: 3000 examples instead of 300.

Invariants: the start raises nothing; every version adopted is one that was committed, exactly
(job, rank, step, commit time, table, meta): no step is ever served that was not committed;
every version and parity record whose files were not touched is kept; every discard is a
WARNING naming the file.
"""

import json
import logging
import os
import shutil
import tempfile

import pytest
from harness import BASE_SEED, LONG, RESULTS, reproduce
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from snapshotd.cluster import peerproto as pp
from snapshotd.cluster.codec import make_codec
from snapshotd.cluster.placement import make_groups
from snapshotd.cluster.protection import ParityRecord, Protector, frames_checksum
from snapshotd.common import protocol as p
from snapshotd.common.protocol import TensorEntry
from snapshotd.node._shm import seal
from snapshotd.node.store import Store

pytestmark = pytest.mark.timeout(1800 if LONG else 120)

EXAMPLES = 3000 if LONG else 300
SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None
JOB = "fz"


def open_node(path):
    """Start on ``path`` as the daemon does: adopt segments, then parity and floors."""
    store = Store(path, memory_limit=64 << 20, keep=10, identity=lambda pid: 1.0)
    report = store.open(retain=False)
    prot = Protector(0, make_groups(3, 2, 1)[0], make_codec("isal", 2, 1), store, links=None,
                     up=lambda slot: True)
    store.retain_all()
    return store, prot, report


def close_node(store, prot):
    prot.close()
    store.close()


def commit(store, rank, step, fill):
    tensors = (TensorEntry("w", "float32", (16,), 0, 64), TensorEntry("b", "uint8", (8,), 64, 8))
    slot = store.alloc(JOB, rank, step, 72, 100, local_world_size=2, world_size=2)
    view = store.dir.view(slot.number, slot.size)
    view[:72] = bytes([fill]) * 72
    view.release()
    return store.commit(slot.number, tensors, json.dumps({"step": step, "rank": rank}),
                        protected=step < 3)


@pytest.fixture(scope="module")
def template():
    path = tempfile.mkdtemp(prefix="snapshotd-fuzz-adopt-", dir=SHM)
    store = Store(path, memory_limit=64 << 20, keep=10, identity=lambda pid: 1.0)
    store.open()
    for step in (1, 2, 3):
        for rank in (0, 1):
            commit(store, rank, step, 16 * step + rank)
    prot = Protector(0, make_groups(3, 2, 1)[0], make_codec("isal", 2, 1), store, links=None,
                     up=lambda slot: True)
    for stripe in [s for s in prot.stripes.values() if s.parity[0] == 0]:
        for step in (1, 2, 3):
            data = bytes([step, stripe.index]) * 50
            frags = tuple(pp.FragInfo(src, 0, 100, json.dumps({"src": src, "step": step}),
                                      step - 1) for src in stripe.data)
            prot.store_parity(ParityRecord(JOB, step, stripe.index, 0, 100, frags,
                                           bytearray(data), frames_checksum([data]),
                                           complete=True))
    prot.on_held(pp.Held(1, (pp.JobFloor(JOB, 2, (1, 2, 3), (0, 1), 2, 2, (1, 2)),),
                         inc=1, seq=1))
    assert os.path.exists(os.path.join(path, "floors.json"))
    versions = {v.number: ident(v) for v in store.versions()}
    parity = {r.number: pident(r) for r in prot.parity_records()}
    files = sorted(os.listdir(path))
    # What a SIGKILLed daemon leaves: the files as they are (close() would remove them).
    saved = tempfile.mkdtemp(prefix="snapshotd-fuzz-template-", dir=SHM)
    for name in files:
        if name.endswith((".json", ".bin")):
            shutil.copy(os.path.join(path, name), saved)
    close_node(store, prot)
    shutil.rmtree(path, ignore_errors=True)
    yield {"path": saved, "versions": versions, "parity": parity,
           "files": sorted(f for f in os.listdir(saved) if f.endswith(".json"))}
    shutil.rmtree(saved, ignore_errors=True)


def ident(v):
    return (v.job, v.rank, v.step, v.nbytes, v.committed_at, v.tensors, v.meta,
            v.local_world_size, v.world_size)


def pident(r):
    return (r.job, r.step, r.stripe, r.index, r.length, r.checksum, r.frags)


# --------------------------------------------------------------------------- damage

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 1 << 40) | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=6)


def paths(value, prefix=()):
    """Every (path, value) inside a decoded JSON value (the root excluded)."""
    out = []
    items = value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, list) else ())
    for key, inner in items:
        out.append((prefix + (key,), inner))
        out += paths(inner, prefix + (key,))
    return out


def same_type(a, b):
    return type(a) is type(b) or {type(a), type(b)} <= {int, float}


@st.composite
def damage(draw, files):
    name = draw(st.sampled_from(files + ["seg.bin", "par.bin"]))
    if name.endswith(".bin"):
        return name, draw(st.sampled_from(["truncate", "flip"])), draw(st.randoms())
    how = draw(st.sampled_from(["retype", "remove", "add", "revalue", "flip", "cut", "empty"]))
    return name, how, draw(st.randoms()), draw(JSON_VALUES)


def apply(path, files, dmg):
    """Damage one file of the copy at ``path``; return (file damaged, whether a discard of it
    is wanted)."""
    name, how, rng = dmg[0], dmg[1], dmg[2]
    if name == "seg.bin" or name == "par.bin":
        prefix = name.split(".")[0] + "-"
        name = rng.choice(sorted(f for f in os.listdir(path)
                                 if f.startswith(prefix) and f.endswith(".bin")))
        target = os.path.join(path, name)
        size = os.path.getsize(target)
        with open(target, "r+b") as fh:
            if how == "truncate":
                fh.truncate(rng.randrange(size))
            else:
                pos = rng.randrange(size)
                fh.seek(pos)
                byte = fh.read(1)[0]
                fh.seek(pos)
                fh.write(bytes([byte ^ (1 << rng.randrange(8))]))
        return name, how == "truncate"               # flipped bytes: found when read
    target = os.path.join(path, name)
    with open(target, "rb") as fh:
        data = fh.read()
    record = json.loads(data)
    value = dmg[3]
    if how in ("flip", "cut", "empty"):
        if how == "flip":
            pos = rng.randrange(len(data))
            data = data[:pos] + bytes([data[pos] ^ (1 << rng.randrange(8))]) + data[pos + 1:]
        else:
            data = data[:rng.randrange(len(data))] if how == "cut" else b""
        with open(target, "wb") as fh:
            fh.write(data)
        return name, True
    record.pop("check")
    where = [(k, v) for k, v in paths(record)]
    key, old = rng.choice(where)
    parent = record
    for part in key[:-1]:
        parent = parent[part]
    if how == "revalue":                             # a new value, the old check: refused
        if value == old:
            return name, False
        parent[key[-1]] = value
        text = json.dumps(record, separators=(",", ":"))
        with open(target, "w") as fh:
            fh.write(text[:-1] + ',"check":"' + json.loads(data)["check"] + '"}')
        return name, True
    if how == "retype":
        if same_type(value, old):
            return name, False
        parent[key[-1]] = value
    elif how == "remove":                            # a field missing (not a list's item:
        if isinstance(parent, list):                 # a shorter list of the right types is
            return name, False                       # an edit the seal was made for)
        del parent[key[-1]]
    else:                                            # add an unknown field
        if not isinstance(parent, dict) or "zz_unknown" in parent:
            return name, False
        parent["zz_unknown"] = value
    with open(target, "w") as fh:
        fh.write(seal(json.dumps(record, separators=(",", ":"))))
    return name, None                                # sealed again: refused, or harmless


# --------------------------------------------------------------------------- the fuzzer


def test_fuzz_adopted_files(template, caplog, request):
    counts = {"examples": 0, "discarded": 0, "survived": 0}

    @seed(BASE_SEED)
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(damage(template["files"]))
    def fuzz(dmg):
        path = tempfile.mkdtemp(prefix="snapshotd-fuzz-node-", dir=SHM)
        caplog.clear()
        try:
            shutil.copytree(template["path"], path, dirs_exist_ok=True)
            name, must_go = apply(path, template["files"], dmg)
            with caplog.at_level(logging.WARNING):
                store, prot, report = open_node(path)
                try:
                    check(template, store, prot, name, must_go, caplog.text, counts)
                finally:
                    close_node(store, prot)
        finally:
            shutil.rmtree(path, ignore_errors=True)
        counts["examples"] += 1
        counts["survived"] += 1

    try:
        fuzz()
    finally:
        RESULTS.tally("fuzz: every adopted file damaged (hypothesis)",
                      "a node's tmpfs (versions of 2 jobs, parity, floors.json) with one file "
                      "damaged in one field (flipped, mistyped, removed, truncated, resealed) "
                      "before a start on it: the node starts, adopts only committed versions, "
                      "keeps every intact one, warns of every discard; one run = one example",
                      reproduce(request.node.nodeid), runs=counts["examples"],
                      survived=counts["survived"], seed=BASE_SEED,
                      figures={"discarded": counts["discarded"]})
    assert counts["examples"] >= EXAMPLES // 2
    assert counts["discarded"] > 0, "no example discarded anything: the damage did nothing"


def check(template, store, prot, name, must_go, warned, counts):
    number = int(name.split("-")[1].split(".")[0]) if "-" in name else -1
    # Every adopted version is exactly one that was committed: no step that never was.
    adopted = {v.number: ident(v) for v in store.versions()}
    for n, got in adopted.items():
        assert got == template["versions"].get(n), f"{name}: adopted {got}, never committed"
    # Every version and parity record whose files were not touched is kept.
    for n, want in template["versions"].items():
        if not (name.startswith("seg-") and n == number):
            assert adopted.get(n) == want, f"{name} damaged: intact version {want} lost"
    held = {r.number: pident(r) for r in prot.parity_records()}
    for n, want in template["parity"].items():
        if not (name.startswith("par-") and n == number):
            assert held.get(n) == want, f"{name} damaged: intact parity {want} lost"
        elif n in held:
            assert held[n] == want, f"{name}: adopted parity {held[n]}, never kept"
    # What the daemon's requests ask answers: Status/ListVersions as encoded on the wire,
    # Inventory, housekeeping's expiry, the node version the encoder would send.
    infos = tuple(p.VersionInfo(v.job, v.rank, v.step, v.nbytes, v.state, v.committed_at,
                                v.world_size) for v in store.versions())
    assert p.decode(p.encode(p.ListReply(infos)))[1].versions == infos
    pp.decode(p.encode(prot.inventory()))
    prot.expire()
    for step in {v.step for v in store.versions()}:
        prot.node_version(JOB, step)
    # Adopted parity is scrubbed: a flipped parity file is found, nothing else.
    prot.scrub_rate = 1 << 40
    bad = {r.number for r in prot.scrub()}
    if name.startswith("par-") and name.endswith(".bin") and number in held:
        assert bad == {number}, f"{name} flipped: scrub found {bad}"
    else:
        assert not bad, f"{name} damaged: scrub found {bad}"
    gone = (name.startswith("seg-") and number not in adopted) or (
        name.startswith("par-") and number not in held) or (
        name == "floors.json" and "ignored" in warned)
    if must_go:
        assert gone, f"{name}: a damaged record was taken as it is"
    if gone:
        counts["discarded"] += 1
        stem = name.split(".")[0]
        assert stem in warned, f"{name} discarded without a warning naming it:\n{warned}"

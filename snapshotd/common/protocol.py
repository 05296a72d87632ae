"""The local control protocol between trainer clients and the node daemon.

Every message is one ZeroMQ frame holding a UTF-8 JSON object::

    {"v": 1, "op": "alloc", "id": 7, "job": "gpt", "rank": 0, ...}

``v`` is :data:`PROTOCOL_VERSION`, ``op`` names the message class, ``id`` is echoed in the
reply so a client can match replies to requests. The remaining keys are the dataclass fields.
Every message is defined exactly once, here, as a frozen dataclass; :func:`decode` checks the
version, the operation and the type of every field before anything else sees the message, so
the daemon never acts on a partly valid request. This module needs only the standard library:
the client distribution ships the same file (see ``docs/protocol.md``).

Example::

    >>> frame = encode(Alloc(job="gpt", rank=0, step=5, nbytes=4096, pid=1234), req_id=1)
    >>> req_id, msg = decode(frame)
    >>> msg.step, req_id
    (5, 1)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Union

__all__ = [
    "PROTOCOL_VERSION", "MAX_MESSAGE_BYTES", "DTYPE_SIZES", "ALIGNMENT", "ProtocolError",
    "TensorEntry", "Alloc", "Commit", "Abort", "ListVersions", "Open", "Release", "Status",
    "Drop", "Verify", "Persist", "Verified", "VerifyReply", "Error", "AllocReply", "CommitReply",
    "Ok", "VersionInfo", "ListReply", "OpenReply", "StatusReply", "Where", "NodeHolding",
    "WhereReply", "encode", "decode", "decode_as", "registry",
    "check_table", "check_job", "check_run",
]

PROTOCOL_VERSION = 1
#: Largest control frame accepted (the tensor table of a very large model fits easily).
MAX_MESSAGE_BYTES = 64 << 20
#: Byte alignment of every tensor inside a slot.
ALIGNMENT = 64
#: Element size of every dtype a snapshot may hold (torch dtype names without ``torch.``):
#: every dtype torch can copy; the sub-byte shells (int1..7, uint1..7) have no copy kernel.
DTYPE_SIZES: dict[str, int] = {
    "bool": 1, "uint8": 1, "int8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "int16": 2, "uint16": 2, "float16": 2,
    "bfloat16": 2, "int32": 4, "uint32": 4, "float32": 4, "complex32": 4, "int64": 8,
    "uint64": 8, "float64": 8, "complex64": 8, "complex128": 16,
    "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1, "bits8": 1, "bits16": 2, "bits1x8": 1,
    "bits2x4": 1, "bits4x2": 1,
}


class ProtocolError(Exception):
    """A request or reply that cannot be accepted; ``code`` is a stable machine-readable tag.

    ``req_id`` is the request's ``id`` when the frame had a readable integer one (set by
    :func:`decode` for a request it refuses), so the error reply can still be matched."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.req_id: int | None = None


#: A job name: one plain path component (it names a directory of the persistence tier).
_JOB_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def check_job(job: str) -> None:
    """Refuse (``bad_request``) a job name that is not one plain path component: letters,
    digits, ``_ . -``, 1 to 128 of them, and neither ``.`` nor ``..``."""
    if not _JOB_RE.fullmatch(job) or job in (".", ".."):
        raise ProtocolError("bad_request", f"job name {job!r} must be 1 to 128 of the "
                            "characters A-Z a-z 0-9 _ . - and not '.' or '..'")


#: The longest run identity (``Alloc.run``) a daemon takes.
MAX_RUN = 256


def check_run(run: str) -> None:
    """Refuse (``bad_request``) a run identity longer than ``MAX_RUN`` or holding characters
    that are not printable ASCII."""
    if len(run) > MAX_RUN or not all(" " < c <= "~" for c in run):
        raise ProtocolError("bad_request", f"run identity {run[:64]!r} must be at most "
                            f"{MAX_RUN} printable ASCII characters without spaces")


# --------------------------------------------------------------------------- payload types


@dataclass(frozen=True)
class TensorEntry:
    """One tensor inside a slot: ``nbytes`` bytes at ``offset``; the daemon sets ``checksum``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    checksum: str = ""


@dataclass(frozen=True)
class VersionInfo:
    """One version as listed by the daemon; ``state`` is ``local`` or ``protected`` (in
    memory), or ``persisted`` (only in the persistence tier)."""

    job: str
    rank: int
    step: int
    nbytes: int
    state: str
    committed_at: float
    #: The job's number of ranks when the version was saved (0: not said): a job restarted
    #: at another world size tells the old layout's versions from the new one's by it.
    world: int = 0
    #: The run identity of the job that wrote the version (``Alloc.run``; "": none).
    run: str = ""


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Alloc:
    """Ask for a write slot of ``nbytes`` for (job, rank, step); ``pid`` is the writer.

    ``local_world_size`` is how many ranks of the job run on this node: once that many ranks
    have committed a step, the node's data for it is erasure-coded across the group."""

    OP: ClassVar[str] = "alloc"
    job: str
    rank: int
    step: int
    nbytes: int
    pid: int
    local_world_size: int = 1
    #: The job's access token (``--job-isolation``; from ``SNAPSHOTD_JOB_TOKEN``); never logged.
    token: str = ""
    #: How many ranks the whole job has (``WORLD_SIZE``; 0: not said). Until every rank has
    #: been heard of, daemons keep the steps a slower node may still report (retention).
    world_size: int = 0
    #: The job's run identity, recorded with the version (docs/design.md section 6): the
    #: launcher's run id (``TORCHELASTIC_RUN_ID``) or ``SNAPSHOTD_RUN``; "": none. Surveys,
    #: reads and drops of the job's clients take only versions of their own run.
    run: str = ""


@dataclass(frozen=True)
class Commit:
    """Publish a written slot; ``meta`` is the JSON skeleton of the non-tensor values."""

    OP: ClassVar[str] = "commit"
    slot: int
    tensors: tuple[TensorEntry, ...]
    meta: str
    #: A digest the client gives its table: sent with the table, the daemon keeps it for the
    #: (job, rank); later commits of the same layout send only the digest and an empty
    #: ``tensors`` (refused ``unknown_layout`` when the daemon no longer has it: send both).
    layout: str = ""
    #: The step, for a slot reserved without one (a spare: see ``next_nbytes``); -1 otherwise.
    step: int = -1
    #: Also reserve a spare slot of this size for the rank's next save (returned in the reply,
    #: when it fits the budget without evicting anything): that save then needs no ``Alloc``.
    next_nbytes: int = 0
    #: Seconds from the client's ``save()`` to this commit (-1: not said; then the slot's age
    #: stands in, which a spare slot reserved at the previous commit does not have).
    took: float = -1.0


@dataclass(frozen=True)
class Abort:
    """Discard a slot that will not be committed."""

    OP: ClassVar[str] = "abort"
    slot: int


@dataclass(frozen=True)
class ListVersions:
    """List committed versions of a job (one rank, or all ranks when ``rank`` is None)."""

    OP: ClassVar[str] = "list"
    job: str
    rank: int | None = None
    #: The job's access token (``--job-isolation``; from ``SNAPSHOTD_JOB_TOKEN``); never logged.
    token: str = ""
    #: Only the versions of this run identity (``Alloc.run``); None: of any (operators' tools).
    run: str | None = None


@dataclass(frozen=True)
class Open:
    """Lease a version for reading: ``step`` None means the newest one not above ``max_step``."""

    OP: ClassVar[str] = "open"
    job: str
    rank: int
    pid: int
    step: int | None = None
    max_step: int | None = None
    verify: bool = True
    #: The job's access token (``--job-isolation``; from ``SNAPSHOTD_JOB_TOKEN``); never logged.
    token: str = ""
    #: The reader maps the segment privately (copy-on-write) and holds the lease until its last
    #: mapping is gone; the daemon then never reuses the segment's file for another write.
    map: bool = False
    #: Where this daemon does not hold the version, fetch it from the node of the cluster that
    #: does (``Where`` lists them): a rank reading another rank's version, held on another
    #: node (a job restored at another world size). Served as tier ``peer``, from a copy the
    #: daemon keeps until :class:`Release`.
    remote: bool = False
    #: Only a version of this run identity (``Alloc.run``); None: of any (operators' tools).
    run: str | None = None


@dataclass(frozen=True)
class Release:
    """Return a read lease."""

    OP: ClassVar[str] = "release"
    lease: int


@dataclass(frozen=True)
class Status:
    """Ask for the daemon's summary. With ``--job-isolation`` the versions listed are those of
    the jobs bound to ``token`` (every job's with the admin token; none without a token)."""

    OP: ClassVar[str] = "status"
    #: A job's access token, or the admin token; never logged.
    token: str = ""


@dataclass(frozen=True)
class Where:
    """Which nodes of the cluster hold which ranks and steps of ``job`` (from their job-wide
    retention reports: what a rank restoring at another world size may read remotely)."""

    OP: ClassVar[str] = "where"
    job: str
    #: The job's access token (``--job-isolation``; from ``SNAPSHOTD_JOB_TOKEN``); never logged.
    token: str = ""
    #: Only the nodes whose versions of the job are of this run identity; None: any.
    run: str | None = None


@dataclass(frozen=True)
class Drop:
    """Drop versions: one ``step``, or every step above ``newer_than``, or all (both None)."""

    OP: ClassVar[str] = "drop"
    job: str
    rank: int | None = None
    step: int | None = None
    newer_than: int | None = None
    #: The job's access token (``--job-isolation``; from ``SNAPSHOTD_JOB_TOKEN``); never logged.
    token: str = ""
    #: Also on every other node of the cluster that reported holding the rank (``newer_than``
    #: only): a job that starts a new timeline at a step it restored at another world size
    #: abandons the newer versions of the saved ranks wherever they are.
    everywhere: bool = False
    #: Nonzero: this drop is a restore's, starting a new timeline of the job from
    #: ``newer_than`` (from nothing without it), which the job's ranks named with this token
    #: (every rank of one restore sends the same; the client derives it in the restore's
    #: agreement). The node's job-wide retention reports carry it, so that no node raises
    #: the job's pin on a stale report of the old timeline (docs/protocol.md).
    timeline: int = 0
    #: With ``everywhere``: the other nodes drop only versions of this run identity (the
    #: job's own; another job of the same name keeps its versions); None: of any.
    run: str | None = None


@dataclass(frozen=True)
class Verify:
    """Recompute the checksums of versions of a job (all ranks/steps when None)."""

    OP: ClassVar[str] = "verify"
    job: str
    rank: int | None = None
    step: int | None = None
    #: The job's access token (``--job-isolation``; from ``SNAPSHOTD_JOB_TOKEN``); never logged.
    token: str = ""


@dataclass(frozen=True)
class Persist:
    """Write (job, step) of this node to the persistence tier now (newest step when None)."""

    OP: ClassVar[str] = "persist"
    job: str
    step: int | None = None
    #: The job's access token (``--job-isolation``; from ``SNAPSHOTD_JOB_TOKEN``); never logged.
    token: str = ""


# --------------------------------------------------------------------------- replies


@dataclass(frozen=True)
class Error:
    """Any request that failed; nothing was changed by it."""

    OP: ClassVar[str] = "error"
    code: str
    message: str


@dataclass(frozen=True)
class Ok:
    """A request that succeeded and has nothing to say; ``count`` is how many items it touched."""

    OP: ClassVar[str] = "ok"
    count: int = 0


@dataclass(frozen=True)
class AllocReply:
    """A write slot: the file under the daemon's shared-memory directory to map and fill."""

    OP: ClassVar[str] = "alloc_reply"
    slot: int
    path: str
    nbytes: int
    #: The CPUs the daemon runs on, where it is pinned to some of the machine's (an operator's
    #: choice: systemd's CPUAffinity, taskset, a cpuset); empty where it may run on all. A
    #: client moves its copy thread there unless ``$SNAPSHOTD_COPY_CPUS`` says otherwise.
    cpus: tuple[int, ...] = ()


@dataclass(frozen=True)
class CommitReply:
    """The version is published and is now the newest local version of (job, rank)."""

    OP: ClassVar[str] = "commit_reply"
    job: str
    rank: int
    step: int
    nbytes: int
    #: The spare slot asked for with ``Commit.next_nbytes`` (0: none), its file and size: the
    #: next save writes it and commits it naming its step (``Abort`` it if unused).
    next_slot: int = 0
    next_path: str = ""
    next_nbytes: int = 0


@dataclass(frozen=True)
class ListReply:
    OP: ClassVar[str] = "list_reply"
    versions: tuple[VersionInfo, ...]


@dataclass(frozen=True)
class OpenReply:
    """A read lease on one version; the bytes stay valid until :class:`Release`."""

    OP: ClassVar[str] = "open_reply"
    lease: int
    job: str
    rank: int
    step: int
    path: str
    nbytes: int
    tensors: tuple[TensorEntry, ...]
    meta: str
    tier: str
    #: How many versions of (job, rank) newer than this one the daemon holds (-1: not said),
    #: so a restore starts its new timeline without a ``Drop`` when there are none.
    newer: int = -1


@dataclass(frozen=True)
class NodeHolding:
    """What one node said it holds of a job: its ranks, the steps every one of them holds,
    and the job's number of ranks when its newest version was saved. ``up``: the node is up
    by the daemon's failure detectors (heartbeats in its group, fresh retention reports
    otherwise); of one that is down, ``steps`` lists only those it reported protected (its
    group can decode them for a reader)."""

    slot: int
    ranks: tuple[int, ...]
    steps: tuple[int, ...]
    world: int = 0
    up: bool = True


@dataclass(frozen=True)
class WhereReply:
    OP: ClassVar[str] = "where_reply"
    nodes: tuple[NodeHolding, ...]


@dataclass(frozen=True)
class Verified:
    """One version checked by :class:`Verify`; ``bad`` names tensors that fail their checksum."""

    job: str
    rank: int
    step: int
    bad: tuple[str, ...]


@dataclass(frozen=True)
class VerifyReply:
    OP: ClassVar[str] = "verify_reply"
    results: tuple[Verified, ...]


@dataclass(frozen=True)
class StatusReply:
    OP: ClassVar[str] = "status_reply"
    node_slot: int
    pid: int
    accepting: bool
    memory_limit: int
    bytes_used: int
    open_slots: int
    open_leases: int
    versions: tuple[VersionInfo, ...]
    peers_up: tuple[int, ...] = ()
    peers_down: tuple[int, ...] = ()
    rebuilding: bool = False
    #: The erasure coding of this node's group (k data, m parity nodes; m = 0: not coded, a
    #: node loss loses its data): clients split replicated state only where m > 0.
    group_k: int = 0
    group_m: int = 0


_MESSAGES: dict[str, type] = {
    cls.OP: cls  # type: ignore[attr-defined]
    for cls in (Alloc, Commit, Abort, ListVersions, Open, Release, Status, Drop, Verify, Persist,
                Where, Error,
                Ok, AllocReply, CommitReply, ListReply, OpenReply, StatusReply, VerifyReply,
                WhereReply)
}
Message = Any


# --------------------------------------------------------------------------- codec


def encode(msg: Message, req_id: int = 0) -> bytes:
    """Serialise one message to its frame."""
    body = {"v": PROTOCOL_VERSION, "op": msg.OP, "id": req_id}
    body.update(_plain(msg))
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def _plain(obj: Any) -> dict[str, Any]:
    """A message's fields as JSON-ready values (what ``dataclasses.asdict`` gives, without its
    deep copies: a table of hundreds of tensors took milliseconds to encode through it)."""
    cls: type = type(obj)
    nested = _nested(cls)
    if not nested:
        return obj.__dict__           # only read (by json.dumps), never changed
    out = dict(obj.__dict__)
    for name in nested:
        value = out[name]
        if type(value) is tuple:
            out[name] = [_plain(v) for v in value]
        elif value is not None:
            out[name] = _plain(value)
    return out


@functools.cache
def _nested(cls: type) -> tuple[str, ...]:
    """The fields of a message class that hold messages (or tuples of them)."""
    out = []
    for name, hint, _ in _fields(cls):
        args = [hint, *typing.get_args(hint)]
        if any(isinstance(a, type) and dataclasses.is_dataclass(a) for a in args):
            out.append(name)
    return tuple(out)


def registry(*classes: type) -> dict[str, type]:
    """A table of message classes by ``OP``, for :func:`decode` (the peer protocol has its own)."""
    return {cls.OP: cls for cls in classes}  # type: ignore[attr-defined]


def decode(frame: bytes, max_bytes: int = MAX_MESSAGE_BYTES,
           messages: dict[str, type] | None = None) -> tuple[int, Message]:
    """Parse and type-check one frame; raise :class:`ProtocolError` naming what is wrong."""
    messages = _MESSAGES if messages is None else messages
    if len(frame) > max_bytes:
        raise ProtocolError("too_large", f"message of {len(frame)} bytes exceeds {max_bytes}")
    try:
        body = json.loads(frame)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError("malformed", f"not a JSON object: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("malformed", "message is not a JSON object")
    raw_id = body.get("id", 0)
    try:
        return _decode_body(body, messages)
    except ProtocolError as exc:
        exc.req_id = raw_id if type(raw_id) is int else None
        raise


def _decode_body(body: dict[str, Any], messages: dict[str, type]) -> tuple[int, Message]:
    version = body.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            "bad_version", f"protocol version {version!r}, this side speaks {PROTOCOL_VERSION}")
    req_id = body.pop("id", 0)
    if type(req_id) is not int:
        raise ProtocolError("malformed", "field 'id' must be an integer")
    op = body.pop("op", None)
    cls: Any = messages.get(op) if isinstance(op, str) else None
    if cls is None:
        raise ProtocolError("unknown_op", f"unknown operation; known: {sorted(messages)}")
    return req_id, _build(cls, body, cls.OP)


def _build(cls: type, body: Any, where: str) -> Any:
    return _checker(cls)(body, where)


def decode_as(cls: type, value: Any, where: str) -> Any:
    """``value`` (decoded JSON) type-checked and built as the dataclass ``cls``, exactly as
    :func:`decode` checks a message's fields: a field of the wrong type, a missing required
    field or an unknown one raises :class:`ProtocolError` (``malformed``) naming it, with
    ``where`` as the path's root. The daemon decodes the records it adopts from its directory
    (manifests, parity descriptions, floors) with it."""
    return _checker(cls)(value, where)


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, Any, bool], ...]:
    """(name, resolved type, required) per field; resolving the hints costs ~0.3 ms a class."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name], f.default is dataclasses.MISSING
                  and f.default_factory is dataclasses.MISSING)
                 for f in dataclasses.fields(cls))


_Checker = typing.Callable[[Any, str], Any]


@functools.cache
def _checker(hint: Any) -> _Checker:
    """A function ``(value, where) -> value`` that type-checks one decoded value against
    ``hint`` (built once per type: decoding a table of hundreds of tensors is then a few plain
    type tests per field instead of resolving the type hints again for every one)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        (inner_hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        inner = _checker(inner_hint)

        def optional(value: Any, where: str) -> Any:
            return None if value is None else inner(value, where)
        return optional
    if origin is tuple:
        item_hint = typing.get_args(hint)[0]
        item = _checker(item_hint)
        plain = item_hint if item_hint in (int, str, bool) else None

        def sequence(value: Any, where: str) -> Any:
            if not isinstance(value, list):
                raise ProtocolError("malformed", f"{where} must be a list")
            if plain is not None and all(type(v) is plain for v in value):
                return tuple(value)
            return tuple([item(v, f"{where}[{i}]") for i, v in enumerate(value)])
        return sequence
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint)
        if key_hint is not str:
            raise TypeError(f"{hint}: JSON object keys are strings")
        entry = _checker(value_hint)

        def mapping(value: Any, where: str) -> Any:
            if not isinstance(value, dict):
                raise ProtocolError("malformed", f"{where} must be an object")
            return {key: entry(v, f"{where}[{key!r}]") for key, v in value.items()}
        return mapping
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        # (name, plain type or None, checker, required): a field of a plain type (int, str,
        # bool) is tested inline, without building its path unless it is wrong.
        fields = [(name, h if h in (int, str, bool) else None, _checker(h), required)
                  for name, h, required in _fields(hint)]
        names = frozenset(name for name, _, _, _ in fields)
        cls = hint
        new = object.__new__
        frozen_plain = not hasattr(cls, "__post_init__") and "__slots__" not in vars(cls)

        def build(value: Any, where: str) -> Any:
            if not isinstance(value, dict):
                raise ProtocolError("malformed", f"{where} must be an object")
            kwargs = {}
            for name, plain, check, required in fields:
                if name in value:
                    got = value[name]
                    if plain is None or type(got) is not plain:
                        got = check(got, f"{where}.{name}")
                    kwargs[name] = got
                elif required:
                    raise ProtocolError("malformed", f"{where}: missing field '{name}'")
            if len(kwargs) != len(value):
                raise ProtocolError("malformed", f"{where}: unexpected fields "
                                    f"{sorted(k for k in value if k not in names)}")
            if frozen_plain and len(kwargs) == len(fields):
                built = new(cls)          # every field given and no __post_init__: set them
                built.__dict__.update(kwargs)   # directly (the frozen __init__ costs
                return built              # microseconds per field)
            return cls(**kwargs)
        return build
    if hint is float:
        def real(value: Any, where: str) -> Any:
            if type(value) is int:
                return float(value)
            if type(value) is not float:
                raise ProtocolError("malformed", f"{where} must be float, got "
                                    f"{type(value).__name__}")
            return value
        return real

    def exact(value: Any, where: str) -> Any:
        if type(value) is not hint:
            raise ProtocolError("malformed",
                                f"{where} must be {hint.__name__}, got {type(value).__name__}")
        return value
    return exact


def check_table(tensors: tuple[TensorEntry, ...], slot_bytes: int) -> None:
    """Check that a tensor table describes disjoint, in-bounds, correctly sized tensors.

    Raises :class:`ProtocolError` (code ``bad_table``) naming the first offending tensor.
    """
    seen: set[str] = set()
    spans = []
    for t in tensors:
        if t.name in seen:
            raise ProtocolError("bad_table", f"tensor {t.name!r} appears twice")
        seen.add(t.name)
        size = DTYPE_SIZES.get(t.dtype)
        if size is None:
            raise ProtocolError("bad_table", f"tensor {t.name!r}: unknown dtype {t.dtype!r}")
        count = 1
        for dim in t.shape:
            if dim < 0:
                raise ProtocolError("bad_table", f"tensor {t.name!r}: negative dimension {dim}")
            count *= dim
        if count * size != t.nbytes:
            raise ProtocolError(
                "bad_table", f"tensor {t.name!r}: shape {list(t.shape)} of {t.dtype} is "
                f"{count * size} bytes, table says {t.nbytes}")
        if t.offset < 0 or t.offset % ALIGNMENT or t.offset + t.nbytes > slot_bytes:
            raise ProtocolError(
                "bad_table", f"tensor {t.name!r}: bytes [{t.offset}, {t.offset + t.nbytes}) "
                f"are not an aligned range inside the {slot_bytes}-byte slot")
        spans.append((t.offset, t.offset + t.nbytes, t.name))
    spans.sort()
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise ProtocolError("bad_table", f"tensors {name!r} and {other!r} overlap")

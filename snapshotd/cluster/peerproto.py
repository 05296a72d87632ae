"""The peer protocol between daemons of one group (ZeroMQ TCP, CURVE-encrypted).

Same framing as the control protocol (one JSON header frame, :data:`protocol.PROTOCOL_VERSION`),
plus payload frames after the header for chunk bytes. See ``docs/protocol.md``.

Encoding a version ``v`` of job ``J`` (docs/design.md section 4)::

    data node x ──PutData(stripe s, frag f)──► first parity holder of s
    first holder, once it has all k fragments: encode, keep parity 0,
                 ──PutParity(index i)──► holder i (i = 1..m-1), each replies Ok
                 ──Protected(s)──► every data node of s

Rebuilding node ``j``: ``Inventory`` from every reachable group peer, then ``GetData`` /
``GetParity`` for the fragments of each stripe, decode, verify tensor checksums.

Example::

    >>> from snapshotd.common.protocol import encode
    >>> _, msg = decode(encode(Ping(slot=2, cluster="c1")))
    >>> msg.slot
    2
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..common import protocol as p

__all__ = ["FragInfo", "Ping", "Pong", "PutData", "HaveData", "PutParity", "Protected",
           "Dropped", "Held", "JobFloor", "Reports", "ReportsReply", "Inventory",
           "DataHolding", "ParityHolding", "InventoryReply", "GetData", "GetParity", "Chunk",
           "GetVersion", "VersionData", "DropNewer",
           "decode", "manifest_id"]


@dataclass(frozen=True)
class FragInfo:
    """One data fragment of a stripe: from node ``src``, its chunk ``frag``, ``length`` bytes.

    ``manifest`` is the source node's node-manifest JSON for this version (its ranks' tables),
    kept by parity holders so a lost node's layout can be rebuilt too. ``floor`` is the newest
    step of the job that ``src`` held as protected when it sent this (-1: none): parity
    holders keep that step's parity while it may be what a loss of ``src`` falls back to."""

    src: int
    frag: int
    length: int
    manifest: str
    floor: int = -1

    def same_fragment(self, other: FragInfo) -> bool:
        """The same bytes of the same version (``floor`` is news about the sender only)."""
        return (self.src, self.frag, self.length, self.manifest) == (
            other.src, other.frag, other.length, other.manifest)


@dataclass(frozen=True)
class Ping:
    OP: ClassVar[str] = "ping"
    slot: int
    cluster: str


@dataclass(frozen=True)
class Pong:
    OP: ClassVar[str] = "pong"
    slot: int
    ready: bool


@dataclass(frozen=True)
class PutData:
    """A data fragment for a stripe's first parity holder; payload: ``info.length`` bytes."""

    OP: ClassVar[str] = "put_data"
    job: str
    step: int
    stripe: int
    info: FragInfo
    checksum: str


@dataclass(frozen=True)
class HaveData:
    """Asked of a stripe's first parity holder before a data fragment is sent again (a
    retry): does it hold ``info``'s bytes already, waiting for the other data nodes' or
    encoded (then it confirms the stripe again)? Answer ``Ok(1)``: held, not sent; ``Ok(0)``:
    send it (``PutData``); ``Error("dropped")``: its node dropped that version."""

    OP: ClassVar[str] = "have_data"
    job: str
    step: int
    stripe: int
    info: FragInfo


@dataclass(frozen=True)
class PutParity:
    """A parity fragment for holder ``index``; payload: ``length`` bytes."""

    OP: ClassVar[str] = "put_parity"
    job: str
    step: int
    stripe: int
    index: int
    length: int
    frags: tuple[FragInfo, ...]
    checksum: str


@dataclass(frozen=True)
class Protected:
    """Stripe ``stripe`` of (job, step) has all its parity stored. To a data node, ``vid``
    names the version of its data that was encoded (:func:`manifest_id` of its node manifest):
    a confirmation of another version of the step (a re-commit) protects nothing."""

    OP: ClassVar[str] = "protected"
    job: str
    step: int
    stripe: int
    vid: str = ""


@dataclass(frozen=True)
class Dropped:
    """Node ``src`` dropped ``steps`` of ``job`` (an abandoned timeline, or an operator's drop):
    parity holders free the parity of the stripes ``src`` is a data node of.

    ``at`` is ``src``'s clock at the drop (the clock its commit times come from): only versions
    ``src`` committed before it are freed, so a late or re-sent notice never frees the parity
    of a step saved again since, on a new timeline (0: every version, as older daemons sent)."""

    OP: ClassVar[str] = "dropped"
    job: str
    src: int
    steps: tuple[int, ...]
    at: float = 0.0


@dataclass(frozen=True)
class JobFloor:
    """The step of ``job`` the sending node asks every node to keep: the lowest, over its
    local ranks, of each rank's newest protected step (its newest step where it holds none
    protected); -1: none."""

    job: str
    floor: int
    #: The steps of ``job`` every local rank of the sending node holds (oldest first): the
    #: job-wide step is the newest step every node holds (empty from a daemon that predates
    #: this field: then the lowest floor is kept, as before).
    held: tuple[int, ...] = ()
    #: The ranks of ``job`` the sending node holds, and how many the job has (0: not said):
    #: until every rank is reported, nodes keep the steps a node not heard yet may hold.
    ranks: tuple[int, ...] = ()
    world: int = 0
    #: The sending node's *pin* of ``job`` (its job-wide step, which it keeps with everything
    #: newer; -1: none yet): a replacement rebuilds the newest pin the others report.
    pin: int = -1
    #: The steps of ``held`` that every local rank of the sending node holds *protected*:
    #: the job-wide step is one of these where one exists (a single loss cannot take it).
    protected: tuple[int, ...] = ()
    #: The timeline the sending node's ranks last restored: the token the restore named it
    #: (0: the job never restored there) and the step it started from (-1: from nothing).
    #: A report of another timeline counts only up to the lower base (protection.on_timeline).
    timeline: int = 0
    base: int = -1
    #: The run identity of the sending node's newest version of ``job`` (``Alloc.run``):
    #: ``Where`` lists a node to a job's client only where it is the client's own.
    run: str = ""
    #: The token digest ``job`` is bound to on the sending node (``--job-isolation``; "":
    #: unbound): the binding travels with the reports, so a node that never held the job
    #: still refuses another token (docs/design.md section 6).
    owner: str = ""


@dataclass(frozen=True)
class Held:
    """Node ``src``'s report: its protected floor of every job it holds. Every daemon keeps the
    newest report of every node of the cluster (all groups) and computes from them, for each
    job, the *job-wide* step (which every rank of the job can restore) and never evicts it. A
    job missing from the list is one ``src`` no longer holds.

    Reports are relayed (``Reports``, docs/protocol.md "Job-wide retention"), so one can
    arrive late, twice, or after a newer one: ``inc`` (the incarnation: when the daemon
    started, in microseconds; a restart is a higher one) and ``seq`` (counted up by every
    report of one incarnation) order the reports of one origin, and a receiver takes a report
    only when ``(inc, seq)`` is higher than the one it holds for ``src``.

    ``recovering``: ``src`` is still rebuilding (it holds too little to speak for its ranks):
    the receiver keeps the floors it last heard from ``src``, learns that ``src`` answers (a
    node that starts waits for every peer to answer, not for their recoveries), and raises no
    job-wide step while ``src`` recovers (it may still be rebuilding the current one).
    ``holding``: the nodes whose "recovering" reports hold ``src``'s job-wide steps where they
    are as it sends this (a recovering node waits for reports that list it: the pins they
    carry were set after their senders heard that it recovers)."""

    OP: ClassVar[str] = "held"
    src: int
    jobs: tuple[JobFloor, ...]
    recovering: bool = False
    inc: int = 0
    seq: int = 0
    holding: tuple[int, ...] = ()

    @property
    def mark(self) -> tuple[int, int]:
        """The report's place among its origin's: higher is newer."""
        return (self.inc, self.seq)


@dataclass(frozen=True)
class Reports:
    """A batch of reports (each with its origin's identity, ``Held.src``), sent by node
    ``sender`` to a neighbour of the overlay (:mod:`snapshotd.cluster.overlay`) every report
    interval: its own newest report and those of other nodes the neighbour may lack.
    ``urgent``: sent at once after a drop lowered a floor; a receiver that learns something
    new from it forwards at once too. Reply: :class:`ReportsReply`."""

    OP: ClassVar[str] = "reports"
    sender: int
    reports: tuple[Held, ...]
    urgent: bool = False


@dataclass(frozen=True)
class ReportsReply:
    """The answer to :class:`Reports`: how many of its reports were new, and the reports its
    sender is not known to have (to a neighbour of the overlay: an edge carries reports both
    ways whenever either side can reach the other)."""

    OP: ClassVar[str] = "reports_reply"
    count: int
    reports: tuple[Held, ...] = ()


@dataclass(frozen=True)
class Inventory:
    """What do you hold of this group? (asked by a node that rebuilds ``slot``)."""

    OP: ClassVar[str] = "inventory"
    slot: int


@dataclass(frozen=True)
class DataHolding:
    """A complete node version the answering node holds as a data node."""

    job: str
    step: int
    total: int


@dataclass(frozen=True)
class ParityHolding:
    job: str
    step: int
    stripe: int
    index: int
    length: int
    frags: tuple[FragInfo, ...]
    #: Data nodes that have since sent another version of this step: this parity must not
    #: rebuild them, nor be combined with their current data.
    stale: tuple[int, ...] = ()


@dataclass(frozen=True)
class InventoryReply:
    OP: ClassVar[str] = "inventory_reply"
    slot: int
    data: tuple[DataHolding, ...]
    parity: tuple[ParityHolding, ...]


@dataclass(frozen=True)
class GetData:
    """Send your chunk ``frag`` of your node version (job, step)."""

    OP: ClassVar[str] = "get_data"
    job: str
    step: int
    frag: int
    #: The version wanted (:func:`manifest_id`); refused (``not_found``) if another is held.
    vid: str = ""


@dataclass(frozen=True)
class GetParity:
    OP: ClassVar[str] = "get_parity"
    job: str
    step: int
    stripe: int
    index: int


@dataclass(frozen=True)
class Chunk:
    """Reply carrying ``length`` bytes of payload and their XXH3 checksum."""

    OP: ClassVar[str] = "chunk"
    length: int
    checksum: str
    manifest: str = ""
    #: For a data chunk: the newest step the sender holds as protected (see FragInfo.floor).
    floor: int = -1


@dataclass(frozen=True)
class GetVersion:
    """Send one rank's whole version (job, rank, step): a node reading, for one of its ranks,
    a rank it does not hold (a job restored at another world size, its ranks elsewhere)."""

    OP: ClassVar[str] = "get_version"
    job: str
    rank: int
    step: int
    #: The requesting client's run identity: the holder serves only a version of it (None:
    #: of any).
    run: str | None = None
    #: The requesting client's token digest (its daemon checked it against its own binding),
    #: or ``admin``: the client presented its daemon's admin token. The holder refuses
    #: (``forbidden``) a digest other than the one the job is bound to there.
    owner: str = ""
    admin: bool = False


@dataclass(frozen=True)
class VersionData:
    """Reply to :class:`GetVersion`: the version's table and skeleton; its bytes follow as
    payload frames, with their XXH3 checksum (the sender verified every tensor first)."""

    OP: ClassVar[str] = "version_data"
    step: int
    nbytes: int
    tensors: tuple[p.TensorEntry, ...]
    meta: str
    checksum: str
    world: int = 0


@dataclass(frozen=True)
class DropNewer:
    """Drop your versions of ``rank`` of ``job`` newer than ``newer_than`` (a job that
    restored that step at another world size started a new timeline there)."""

    OP: ClassVar[str] = "drop_newer"
    job: str
    rank: int
    newer_than: int
    #: As in :class:`GetVersion`: only versions of this run identity go (None: any), and the
    #: requester's token digest (or ``admin``) must be the job's binding on the holder.
    run: str | None = None
    owner: str = ""
    admin: bool = False


_PEER_MESSAGES = p.registry(Ping, Pong, PutData, HaveData, PutParity, Protected, Dropped,
                            Held, Reports, ReportsReply, Inventory,
                            InventoryReply, GetData, GetParity, Chunk, GetVersion, VersionData,
                            DropNewer, p.Ok, p.Error)


def manifest_id(manifest: str) -> str:
    """The identity of one version of a node's data: a hash of its node manifest (ranks,
    commit times, tables). A re-commit of a step is another version with another id."""
    import xxhash

    return xxhash.xxh3_64_hexdigest(manifest.encode())


def decode(frame: bytes) -> tuple[int, Any]:
    """Parse one peer header frame (see :func:`snapshotd.common.protocol.decode`)."""
    return p.decode(frame, messages=_PEER_MESSAGES)

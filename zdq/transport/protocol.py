"""The zdq wire protocol: every frame layout in one place.

A message is a ZeroMQ multipart message of one *head* frame and the command's payload frames::

    [VERSION + command (1 byte) + header (fixed struct per command), payload frames...]

On a ROUTER socket the peer's routing identity precedes these frames. Payloads (chunks of tasks and
their results) are opaque bytes to the broker: it stores and forwards them, and never unpickles them.
Version, command and header share one frame because every frame costs a system-level send and
receive on both ends: on the single-task round trip, frames were most of the protocol's cost.

Commands
--------
=========  ======================  ==========================================================
HELLO      driver/consumer→broker  role; announces a peer (payload: its display name)
PUT        driver→broker           seq, n_tasks, base task id[, not_before, priority]; payload: one
                                   chunk[, tags]. The release time (wall clock, float seconds) and
                                   the signed priority are in the head only when set (a delayed or
                                   prioritised chunk); a third frame, only when set, carries the
                                   chunk's tags: expiry time, rate limit (its bucket's key and
                                   tasks/s), unique key and how long it stays taken
PUTS       driver→broker           n, then n chunk heads (seq, n_tasks, base task id, not_before,
                                   priority, length of its tags), then the tags of those that have
                                   any, all in the head frame; payload: n chunks, one frame each.
                                   Several chunks for one broker in one message (one send, receive
                                   and decode for them all); each is stored and confirmed as a PUT's
CONFIRM    broker→driver           seq, chunk id, status; once the chunk is stored (a stored chunk's
                                   CONFIRM is held back a moment: RESULTS sent first confirm it); a unique
                                   chunk whose key is held is not stored: DUPLICATE names the chunk
                                   holding it (its RESULTS follow), UNIQUE_HELD refuses it
CONFIRMS   broker→driver           n, then n pairs (seq, chunk id) in the head: several stored chunks
                                   confirmed in one message (CONFIRM's STORED, held back together)
FETCH      consumer→broker         credit: how many more chunks the consumer accepts; 0 withdraws
                                   every credit it gave (a DELIVER already on its way may still come)
READY      broker→consumer         chunks are ready here and this consumer holds no credit: ask if
                                   you can (sent when work arrives, and again with each heartbeat)
DELIVER    broker→consumer         chunk id, n_tasks, attempt[, spacing]; payload: the leased chunk.
                                   The spacing (float seconds, in the head only when set) comes
                                   with a chunk a rate limit let go: the consumer starts its tasks
                                   (and retries) at least that far apart
DONE       consumer→broker         chunk id, n_tasks, credit (a FETCH riding along); payload: the
                                   results of the chunk
RESULTS    broker→driver           seq, chunk id, consumer id; payload: the results
RETURN     consumer→broker         chunk id; gives an unstarted leased chunk back
ACK        consumer→broker         chunk id; early acknowledgement (at most once): results follow
LOST       broker→driver           seq, chunk id; an early-acked chunk's consumer died before DONE
EXPIRED    broker→driver           seq, chunk id, base task id, n_tasks: the chunk's expiry passed
                                   before it was delivered; its tasks never run. Held and sent
                                   again like RESULTS (and kept on disk by a durable queue) until
                                   the driver's RACK
DEAD       consumer→broker         origin chunk id, task id; payload: the task as a chunk, reason
SPLIT      consumer→broker         chunk id, n; payload: n one-task chunks replacing a redelivered one
RACK       driver→broker           n, then n ids (in the head) of chunks whose RESULTS arrived: the
                                   broker may now forget them (until then a broker restart re-runs
                                   them); drivers batch these receipts
SYNC       driver→broker           token, n, then n seqs (in the head) of chunks the driver still
                                   awaits results for: asks for the queue's counts and which of
                                   those chunks the broker does not hold (after a recovery); a
                                   second frame ``consumers`` also asks which consumers it hears
STATUS     broker→driver           token, ready/leased/dead tasks, done tasks whose results wait
                                   for a driver, tasks routed to this
                                   driver so far, n, then the n seqs of the SYNC that it does not hold;
                                   when asked, a second frame of the consumers' 16-byte digests
CANCEL     driver→broker           token, chunk id (0 if not known yet), seq, n, then n task
                                   indexes within the chunk: cancel those tasks if none has started
           broker→consumer         token, chunk id, 0, n, indexes: the same question for a chunk
                                   leased to it; token 0 announces tasks already cancelled of the
                                   chunk DELIVERed next (no answer)
CANCELLED  broker→driver,          token, n, then the n indexes that will never run (the others had
           consumer→broker         started, or finished, or are not held here)
HEARTBEAT  both ways               liveness; a consumer's heartbeat renews its leases
RETRIED    consumer→broker         chunk id, n, then n pairs (task id, attempts failed so far) in the
                                   head: those tasks of a chunk the consumer holds failed and will
                                   run again (sent before each retry's wait)
           broker→consumer         the same for the chunk DELIVERed next (its earlier consumer died
                                   between retries): the tasks' retries count on from there
WHO        broker→peer             the broker does not know this peer (a consumer it took for gone
                                   after heartbeat-timeout of silence speaks again): the peer says
                                   HELLO again on that link, and a consumer gives its credit anew
BYE        peer→broker             the peer leaves; its leases return at once
=========  ======================  ==========================================================
"""

from __future__ import annotations

import enum
import hashlib
import math
import struct
from collections.abc import Callable, Sequence
from typing import Any, Generic, NamedTuple, TypeVar, Union

from zdq.codec.rates import rate_fault
from zdq.errors import ProtocolError

__all__ = [
    "VERSION",
    "Command",
    "Role",
    "Status",
    "Hello",
    "Put",
    "Puts",
    "Confirm",
    "Confirms",
    "Fetch",
    "Deliver",
    "Done",
    "Results",
    "Return",
    "Ack",
    "Lost",
    "Expired",
    "Dead",
    "Split",
    "Rack",
    "Ready",
    "Who",
    "Retried",
    "Sync",
    "QueueStatus",
    "Cancel",
    "Cancelled",
    "Heartbeat",
    "Bye",
    "Message",
    "encode",
    "decode",
    "Routes",
    "ID_SIZE",
    "MAX_CHUNK_TASKS",
    "MAX_CONSUMERS_TOLD",
    "consumer_digest",
    "MAX_PUTS",
    "PUTS_CHUNKS",
    "PUTS_BYTES",
    "MAX_KEY",
    "MAX_PEER_NAME",
    "TAGS",
    "pack_tags",
    "unpack_tags",
]

#: First bytes of every message; the last byte is the protocol version. 6: chunks may come as
#: SHARED (calls by columns, zdq.codec.tasks), which a consumer of 5 cannot read. 7: payloads
#: are sealed with a GMAC (zdq.codec.seal), which a peer of 6 cannot check.
VERSION = b"ZDQ\x07"
#: Size of the random identities of drivers and consumers.
ID_SIZE = 16


class Command(enum.IntEnum):
    HELLO = 1
    PUT = 2
    CONFIRM = 3
    FETCH = 4
    DELIVER = 5
    DONE = 6
    RESULTS = 7
    RETURN = 8
    HEARTBEAT = 9
    BYE = 10
    ACK = 11
    LOST = 12
    DEAD = 13
    SPLIT = 14
    RACK = 15
    READY = 16
    SYNC = 17
    STATUS = 18
    CANCEL = 19
    CANCELLED = 20
    EXPIRED = 21
    CONFIRMS = 22
    PUTS = 23
    WHO = 24
    RETRIED = 25


class Role(enum.IntEnum):
    DRIVER = 1
    CONSUMER = 2


class Status(enum.IntEnum):
    """Outcome carried by CONFIRM."""

    STORED = 0
    FULL = 1  # storage full: the chunk was not stored
    REFUSED = 2  # malformed or oversized: the chunk was not stored
    ERROR = 3  # any other storage failure: the chunk was not stored
    #: A unique chunk whose key a chunk of this queue holds (queued or running): not stored; the
    #: CONFIRM's chunk id is that chunk's, whose RESULTS (or LOST) this driver gets too.
    DUPLICATE = 4
    #: A unique chunk whose key is held by the ``unique_for`` window of a chunk that ended: not
    #: stored; the detail is ``b"<free at, wall clock>"`` then a space and the reason.
    UNIQUE_HELD = 5


# Messages are named tuples: built and unpacked on every hop, they must be cheap to make.
class Hello(NamedTuple):
    role: Role
    name: bytes = b""


class Put(NamedTuple):
    """A chunk in; the fields after ``chunk`` are :class:`~zdq.storage.base.ChunkMeta`'s, in its
    order (see :class:`~zdq.codec.timing.Timing` for what they mean)."""

    seq: int
    n_tasks: int
    chunk: object  # bytes or zmq.Frame: opaque
    not_before: float = 0.0  # wall-clock seconds before which it is not delivered (0: at once)
    priority: int = 0  # higher first within a queue
    base: int = 0  # the first task id of the chunk (its tasks' ids are consecutive); 0: not known
    expires: float = 0.0  # the tags, in the third frame when any is set
    rate_key: bytes = b""
    rate: float = 0.0
    unique_key: bytes = b""
    unique_for: float = 0.0


class Puts(NamedTuple):
    """Several chunks for one broker in one message, each a :class:`Put` (its timing and tags
    its own): one send, receive and decode for them all. The broker stores and confirms each as
    it would a PUT's; the driver counts each against the broker's window."""

    puts: tuple[Put, ...]


class Confirm(NamedTuple):
    seq: int
    chunk_id: int
    status: Status
    detail: bytes = b""


class Confirms(NamedTuple):
    """Several chunks stored: ``seqs[i]`` (the driver's number) is stored as ``chunk_ids[i]``.
    One message for a driver's confirms held back together: one send, receive and decode for
    them all, where CONFIRMs cost one each."""

    seqs: tuple[int, ...]
    chunk_ids: tuple[int, ...]


class Fetch(NamedTuple):
    credit: int


class Deliver(NamedTuple):
    chunk_id: int
    n_tasks: int
    attempt: int
    chunk: object
    spacing: float = 0.0  # a rate-limited chunk's: seconds between its tasks' starts (0: none)


class Done(NamedTuple):
    chunk_id: int
    n_tasks: int
    results: object
    credit: int = 0  # more chunks the consumer accepts: saves a FETCH message and a broker round


class Results(NamedTuple):
    seq: int
    chunk_id: int
    consumer: bytes
    results: object


class Return(NamedTuple):
    chunk_id: int


class Ack(NamedTuple):
    chunk_id: int


class Lost(NamedTuple):
    seq: int
    chunk_id: int


class Expired(NamedTuple):
    seq: int
    chunk_id: int
    base: int  # the chunk's first task id (0: not known; then every task of the driver's chunk)
    n_tasks: int


class Dead(NamedTuple):
    chunk_id: int
    task_id: int
    chunk: object
    reason: bytes


class Split(NamedTuple):
    chunk_id: int
    parts: Sequence[object]


class Rack(NamedTuple):
    chunk_ids: tuple[int, ...]


class Ready(NamedTuple):
    pass


class Sync(NamedTuple):
    token: int
    seqs: tuple[int, ...] = ()
    consumers: bool = False  # the answer tells the consumers the broker hears (a second frame)


class QueueStatus(NamedTuple):
    token: int
    ready_tasks: int
    leased_tasks: int
    dead_tasks: int
    waiting_tasks: int  # done, their results not yet sent to any driver
    routed_tasks: int  # tasks whose results this broker sent to the asking driver, ever
    missing: tuple[int, ...] = ()
    #: The digests (:func:`consumer_digest`) of the routing identities of the consumers the broker
    #: hears (those that said HELLO and not BYE), when the SYNC asked for them; None otherwise. Not
    #: the identities themselves: a peer that has one could take that consumer's place (its
    #: deliveries) in the broker's ROUTER.
    consumer_digests: tuple[bytes, ...] | None = None


class Cancel(NamedTuple):
    token: int  # the asker's number for the question; 0: no answer wanted
    chunk_id: int  # the broker's id for the chunk; 0 when a driver does not know it yet
    seq: int  # the driver's number for the chunk (driver to broker only)
    indexes: tuple[int, ...]  # tasks of the chunk, counted from its first


class Cancelled(NamedTuple):
    token: int
    indexes: tuple[int, ...]  # those of the question's tasks that will never run


class Heartbeat(NamedTuple):
    pass


class Bye(NamedTuple):
    pass


class Who(NamedTuple):
    pass


class Retried(NamedTuple):
    chunk_id: int
    failed: tuple[tuple[int, int], ...]  # (task id, attempts of it that failed so far)


Message = Union[
    Hello, Put, Puts, Confirm, Confirms, Fetch, Deliver, Done, Results, Return, Ack, Lost, Expired, Dead, Split, Rack, Ready, Sync,
    QueueStatus, Cancel, Cancelled, Heartbeat, Bye, Who, Retried,
]

#: Most tasks a chunk may hold (and parts a SPLIT may carry): a peer's claim is never trusted beyond.
MAX_SPLIT = MAX_CHUNK_TASKS = 100_000
#: Most chunks a PUTS may carry (a peer's claim is never trusted beyond).
MAX_PUTS = 64
#: What a driver puts in one PUTS at most: this many chunks, of this many payload bytes in all (a
#: chunk larger than that goes alone). Each chunk is its own frame, so ``max-message-size`` (per
#: frame) bounds each as it bounds a PUT's.
PUTS_CHUNKS = 16
PUTS_BYTES = 4 << 20


def _layout(command: Command, fmt: str) -> struct.Struct:
    # VERSION, the command byte, then the command's fixed header, all in the head frame.
    return struct.Struct(">4sB" + fmt)


_HELLO = _layout(Command.HELLO, "B")
_PUT = _layout(Command.PUT, "QIQ")
_PUT_TIMED = _layout(Command.PUT, "QIQdi")  # a delayed or prioritised chunk: the plain head + 12 bytes
#: A PUT's tags frame: expires, rate, unique_for, the lengths of rate_key and unique_key, then those keys.
TAGS = struct.Struct(">dddHH")
#: The longest rate or unique key.
MAX_KEY = 1024
#: The most bytes of a peer's name a HELLO carries (a broker keeps no more of a longer one).
MAX_PEER_NAME = 256
#: The widest spacing a DELIVER may ask between task starts (a slow limit's, shared by many queues).
MAX_SPACING = 1e9
#: A PUTS's head: the count, then one of these per chunk (seq, n_tasks, base, not_before, priority,
#: length of its tags), then the tags of each chunk that has any, in order.
_PUTS = _layout(Command.PUTS, "I")
_PUTS_CHUNK = struct.Struct(">QIQdiI")
_CONFIRM = _layout(Command.CONFIRM, "QQB")
_CONFIRMS = _layout(Command.CONFIRMS, "I")  # count; followed by (seq, chunk id) pairs, 16 bytes each
_FETCH = _layout(Command.FETCH, "I")
_DELIVER = _layout(Command.DELIVER, "QII")
_DELIVER_PACED = _layout(Command.DELIVER, "QIId")  # a rate-limited chunk: the plain head + its spacing
_PACED_SIZE = _DELIVER_PACED.size
_DONE = _layout(Command.DONE, "QII")
_RESULTS = _layout(Command.RESULTS, "QQ16s")
_ID = _layout(Command.RETURN, "Q")  # RETURN and ACK
_LOST = _layout(Command.LOST, "QQ")  # LOST and DEAD
_EXPIRED = _layout(Command.EXPIRED, "QQQI")
_SPLIT = _layout(Command.SPLIT, "QI")
_RETRIED = _layout(Command.RETRIED, "QI")  # chunk id, count; followed by the (task id, failed) pairs
_FAILED = struct.Struct(">QI")
#: The most attempts a RETRIED may say a task failed (a peer's claim is never trusted beyond).
MAX_FAILED = 1_000_000
_RACK = _layout(Command.RACK, "I")  # followed by the ids, 8 bytes each, in the same frame
_SYNC = _layout(Command.SYNC, "QI")  # token, count; followed by the seqs, 8 bytes each
_STATUS = _layout(Command.STATUS, "QQQQQQI")  # token, counts, routed, count; then the seqs
_CANCEL = _layout(Command.CANCEL, "QQQI")  # token, chunk id, seq, count; then the indexes
_CANCELLED = _layout(Command.CANCELLED, "QI")  # token, count; then the indexes
_HEAD = {c: VERSION + bytes([c]) for c in Command}  # the head of a message without a header
_ROLES = {r.value: r for r in Role}
_STATUSES = {s.value: s for s in Status}
_V = VERSION

#: A SYNC's second frame when its answer is to tell the consumers the broker hears.
_ASK_CONSUMERS = b"consumers"
#: Most consumers a STATUS tells (a broker tells no more; a peer's claim is never trusted beyond).
MAX_CONSUMERS_TOLD = 65_536
_DIGEST = 16  # bytes of a consumer's digest
_DIGEST_PERSON = b"zdq-consumer"


def consumer_digest(identity: bytes) -> bytes:
    """What a STATUS tells of a consumer it hears: a one-way digest of its routing identity
    (BLAKE2b, 16 bytes), which names it to whoever knows the identity (the pool that placed it)
    and to nobody else."""
    return hashlib.blake2b(identity, digest_size=_DIGEST, person=_DIGEST_PERSON).digest()


def _encode_put(m: Put) -> list[Any]:
    if m.expires or m.rate_key or m.rate or m.unique_key or m.unique_for:
        head = _PUT_TIMED.pack(_V, Command.PUT, m.seq, m.n_tasks, m.base, m.not_before, m.priority)
        return [head, m.chunk, pack_tags(m.expires, m.rate_key, m.rate, m.unique_key, m.unique_for)]
    if m.not_before or m.priority:
        return [_PUT_TIMED.pack(_V, Command.PUT, m.seq, m.n_tasks, m.base, m.not_before, m.priority), m.chunk]
    return [_PUT.pack(_V, Command.PUT, m.seq, m.n_tasks, m.base), m.chunk]


def _encode_puts(m: Puts) -> list[Any]:
    puts = m.puts
    heads = [_PUTS.pack(_V, Command.PUTS, len(puts))]
    tags = []
    for put in puts:
        tagged = b""
        if put.expires or put.rate_key or put.rate or put.unique_key or put.unique_for:
            tagged = pack_tags(put.expires, put.rate_key, put.rate, put.unique_key, put.unique_for)
            tags.append(tagged)
        heads.append(_PUTS_CHUNK.pack(put.seq, put.n_tasks, put.base, put.not_before, put.priority, len(tagged)))
    return [b"".join(heads + tags), *[put.chunk for put in puts]]


def pack_tags(expires: float, rate_key: bytes, rate: float, unique_key: bytes, unique_for: float) -> bytes:
    """A chunk's tags as they travel in a PUT and are stored with a durable chunk."""
    return TAGS.pack(expires, rate, unique_for, len(rate_key), len(unique_key)) + rate_key + unique_key


def unpack_tags(raw: bytes) -> tuple[float, bytes, float, bytes, float]:
    """``(expires, rate_key, rate, unique_key, unique_for)`` of :func:`pack_tags`' bytes.

    Raises
    ------
    ProtocolError
        If they are not such bytes: wrong lengths, a key over :data:`MAX_KEY` bytes, a time or
        rate that is negative or not finite.
    """
    if len(raw) < TAGS.size:
        raise ProtocolError(f"chunk tags of {len(raw)} bytes, at least {TAGS.size} expected")
    expires, rate, unique_for, n_rate, n_unique = TAGS.unpack_from(raw)
    if len(raw) != TAGS.size + n_rate + n_unique or n_rate > MAX_KEY or n_unique > MAX_KEY:
        raise ProtocolError(f"chunk tags of {len(raw)} bytes do not hold keys of {n_rate} and {n_unique} bytes")
    for name, value in (("expires", expires), ("rate", rate), ("unique_for", unique_for)):
        if not 0.0 <= value < math.inf:
            raise ProtocolError(f"chunk tags: {name} is {value!r}")
    keys = raw[TAGS.size :]
    return expires, keys[:n_rate], rate, keys[n_rate:], unique_for


def _put_tags(raw: bytes) -> tuple[float, bytes, float, bytes, float]:
    """:func:`unpack_tags` of a PUT's (or a PUTS chunk's) tags, whose rate is held to the API's
    bounds (:func:`~zdq.codec.rates.rate_fault`): a peer stores no rate a call would refuse (one
    of ``5e-324`` made its broker's waits infinite, and its monitoring reports were refused).
    Tags a durable queue stored are read without them: a queue opens whatever an earlier
    version let in."""
    tags = unpack_tags(raw)
    fault = rate_fault(tags[2])
    if fault is not None:
        raise ProtocolError(f"chunk tags: the rate {fault}, got {tags[2]!r}")
    return tags


def _encode_rack(m: Rack) -> list[Any]:
    ids = m.chunk_ids
    return [_RACK.pack(_V, Command.RACK, len(ids)) + struct.pack(f">{len(ids)}Q", *ids)]


def _encode_confirms(m: Confirms) -> list[Any]:
    seqs, ids = m.seqs, m.chunk_ids
    n = len(seqs)
    if len(ids) != n:
        raise ProtocolError(f"CONFIRMS of {n} seqs and {len(ids)} chunk ids")
    if n > MAX_SPLIT:  # what decode refuses is never sent (the broker sends more in several)
        raise ProtocolError(f"CONFIRMS of {n} chunks: at most {MAX_SPLIT} a message")
    pairs = [0] * (2 * n)
    pairs[0::2], pairs[1::2] = seqs, ids
    return [_CONFIRMS.pack(_V, Command.CONFIRMS, n) + struct.pack(f">{2 * n}Q", *pairs)]


def _encode_sync(m: Sync) -> list[Any]:
    seqs = m.seqs
    head = _SYNC.pack(_V, Command.SYNC, m.token, len(seqs)) + struct.pack(f">{len(seqs)}Q", *seqs)
    return [head, _ASK_CONSUMERS] if m.consumers else [head]


def _encode_status(m: QueueStatus) -> list[Any]:
    missing = m.missing
    head = _STATUS.pack(
        _V, Command.STATUS, m.token, m.ready_tasks, m.leased_tasks, m.dead_tasks, m.waiting_tasks,
        m.routed_tasks, len(missing),
    )
    head += struct.pack(f">{len(missing)}Q", *missing)
    if m.consumer_digests is None:
        return [head]
    return [head, b"".join(m.consumer_digests)]


def _encode_cancel(m: Cancel) -> list[Any]:
    ids = m.indexes
    return [_CANCEL.pack(_V, Command.CANCEL, m.token, m.chunk_id, m.seq, len(ids)) + struct.pack(f">{len(ids)}Q", *ids)]


def _encode_cancelled(m: Cancelled) -> list[Any]:
    ids = m.indexes
    return [_CANCELLED.pack(_V, Command.CANCELLED, m.token, len(ids)) + struct.pack(f">{len(ids)}Q", *ids)]


_ENCODERS: dict[type, Callable[[Any], list[Any]]] = {
    Deliver: lambda m: [
        _DELIVER_PACED.pack(_V, Command.DELIVER, m.chunk_id, m.n_tasks, m.attempt, m.spacing)
        if m.spacing
        else _DELIVER.pack(_V, Command.DELIVER, m.chunk_id, m.n_tasks, m.attempt),
        m.chunk,
    ],
    Done: lambda m: [_DONE.pack(_V, Command.DONE, m.chunk_id, m.n_tasks, m.credit), m.results],
    Put: _encode_put,
    Puts: _encode_puts,
    Results: lambda m: [_RESULTS.pack(_V, Command.RESULTS, m.seq, m.chunk_id, m.consumer), m.results],
    Confirm: lambda m: [_CONFIRM.pack(_V, Command.CONFIRM, m.seq, m.chunk_id, m.status), m.detail],
    Confirms: _encode_confirms,
    Fetch: lambda m: [_FETCH.pack(_V, Command.FETCH, m.credit)],
    Return: lambda m: [_ID.pack(_V, Command.RETURN, m.chunk_id)],
    Ack: lambda m: [_ID.pack(_V, Command.ACK, m.chunk_id)],
    Lost: lambda m: [_LOST.pack(_V, Command.LOST, m.seq, m.chunk_id)],
    Expired: lambda m: [_EXPIRED.pack(_V, Command.EXPIRED, m.seq, m.chunk_id, m.base, m.n_tasks)],
    Dead: lambda m: [_LOST.pack(_V, Command.DEAD, m.chunk_id, m.task_id), m.chunk, m.reason],
    Split: lambda m: [_SPLIT.pack(_V, Command.SPLIT, m.chunk_id, len(m.parts)), *m.parts],
    Rack: _encode_rack,
    Sync: _encode_sync,
    QueueStatus: _encode_status,
    Cancel: _encode_cancel,
    Cancelled: _encode_cancelled,
    Ready: lambda m: [_HEAD[Command.READY]],
    Hello: lambda m: [_HELLO.pack(_V, Command.HELLO, m.role), m.name],
    Heartbeat: lambda m: [_HEAD[Command.HEARTBEAT]],
    Who: lambda m: [_HEAD[Command.WHO]],
    Retried: lambda m: [
        _RETRIED.pack(_V, Command.RETRIED, m.chunk_id, len(m.failed)) + b"".join(_FAILED.pack(t, n) for t, n in m.failed)
    ],
    Bye: lambda m: [_HEAD[Command.BYE]],
}


def encode(msg: Message) -> list[Any]:
    """Frames for ``msg`` (without any routing identity)."""
    encoder = _ENCODERS.get(type(msg))
    if encoder is None:
        raise ProtocolError(f"cannot encode {type(msg).__name__}")
    return encoder(msg)


def _bytes(frame: object) -> bytes:
    # zmq.Frame exposes .bytes; plain bytes pass through.
    data = getattr(frame, "bytes", frame)
    if not isinstance(data, bytes):
        raise ProtocolError(f"frame of type {type(frame).__name__} is not bytes")
    return data


def _unpack(layout: struct.Struct, head: bytes, frames: Sequence[Any], n_frames: int) -> tuple[Any, ...]:
    if len(head) != layout.size:
        raise ProtocolError(f"{Command(head[4]).name} head has {len(head)} bytes, expected {layout.size}")
    if len(frames) != n_frames:
        raise ProtocolError(f"{Command(head[4]).name} has {len(frames)} frames, expected {n_frames}")
    return layout.unpack(head)


def _n_tasks(n: int, head: bytes) -> int:
    if not 1 <= n <= MAX_CHUNK_TASKS:
        raise ProtocolError(f"{Command(head[4]).name} claims {n} tasks; a chunk holds 1 to {MAX_CHUNK_TASKS}")
    return n


def _put(head: bytes, f: Sequence[Any]) -> Message:
    if len(head) == _PUT_TIMED.size:
        tagged = len(f) == 3
        _, _, seq, n, base, not_before, priority = _unpack(_PUT_TIMED, head, f, 3 if tagged else 2)
        if not 0.0 <= not_before < math.inf:
            raise ProtocolError(f"PUT releases its chunk at {not_before!r}, not a time")
        if tagged:
            return Put(seq, _n_tasks(n, head), f[1], not_before, priority, base, *_put_tags(_bytes(f[2])))
        return Put(seq, _n_tasks(n, head), f[1], not_before, priority, base)
    _, _, seq, n, base = _unpack(_PUT, head, f, 2)
    return Put(seq, _n_tasks(n, head), f[1], 0.0, 0, base)


def _puts(head: bytes, f: Sequence[Any]) -> Message:
    """A PUTS: every count and length checked against what the message carries before any chunk
    is made, so that no chunk's bytes (frame or tags) can be read as another's."""
    if len(head) < _PUTS.size:
        raise ProtocolError(f"PUTS head has {len(head)} bytes, at least {_PUTS.size} expected")
    count = _PUTS.unpack_from(head)[-1]
    if not 1 <= count <= MAX_PUTS or len(f) != 1 + count:
        raise ProtocolError(f"PUTS announces {count} chunks (1 to {MAX_PUTS}) and carries {len(f) - 1} frames")
    at = _PUTS.size
    tags_at = at + _PUTS_CHUNK.size * count
    if len(head) < tags_at:
        raise ProtocolError(f"PUTS head of {len(head)} bytes cannot hold the heads of {count} chunks")
    heads = list(_PUTS_CHUNK.iter_unpack(head[at:tags_at]))
    if len(head) != tags_at + sum(h[5] for h in heads):
        raise ProtocolError(f"PUTS head of {len(head)} bytes does not hold the tags its chunks announce")
    puts = []
    for (seq, n, base, not_before, priority, n_tags), chunk in zip(heads, f[1:]):
        if not 0.0 <= not_before < math.inf:
            raise ProtocolError(f"PUTS releases chunk {seq} at {not_before!r}, not a time")
        if n_tags:
            tags = _put_tags(head[tags_at : tags_at + n_tags])
            tags_at += n_tags
            puts.append(Put(seq, _n_tasks(n, head), chunk, not_before, priority, base, *tags))
        else:
            puts.append(Put(seq, _n_tasks(n, head), chunk, not_before, priority, base))
    return Puts(tuple(puts))


def _deliver(head: bytes, f: Sequence[Any]) -> Message:
    if len(head) == _PACED_SIZE:
        _, _, chunk_id, n, attempt, spacing = _unpack(_DELIVER_PACED, head, f, 2)
        if not 0.0 <= spacing <= MAX_SPACING:
            raise ProtocolError(f"DELIVER spaces its tasks {spacing!r} s apart (0 to {MAX_SPACING:g})")
        return Deliver(chunk_id, _n_tasks(n, head), attempt, f[1], spacing)
    _, _, chunk_id, n, attempt = _unpack(_DELIVER, head, f, 2)
    return Deliver(chunk_id, _n_tasks(n, head), attempt, f[1])


def _done(head: bytes, f: Sequence[Any]) -> Message:
    _, _, chunk_id, n, credit = _unpack(_DONE, head, f, 2)
    return Done(chunk_id, _n_tasks(n, head), f[1], credit)


def _results(head: bytes, f: Sequence[Any]) -> Message:
    _, _, seq, chunk_id, consumer = _unpack(_RESULTS, head, f, 2)
    return Results(seq, chunk_id, consumer, f[1])


def _confirm(head: bytes, f: Sequence[Any]) -> Message:
    _, _, seq, chunk_id, status = _unpack(_CONFIRM, head, f, 2)
    known = _STATUSES.get(status)
    if known is None:
        raise ProtocolError(f"unknown CONFIRM status {status}")
    return Confirm(seq, chunk_id, known, _bytes(f[1]))


def _hello(head: bytes, f: Sequence[Any]) -> Message:
    _, _, role = _unpack(_HELLO, head, f, 2)
    known = _ROLES.get(role)
    if known is None:
        raise ProtocolError(f"unknown role {role}")
    return Hello(known, _bytes(f[1])[:MAX_PEER_NAME])


def _split(head: bytes, f: Sequence[Any]) -> Message:
    if len(head) != _SPLIT.size:
        raise ProtocolError(f"SPLIT head has {len(head)} bytes, expected {_SPLIT.size}")
    _, _, chunk_id, n_parts = _SPLIT.unpack(head)
    if not 1 <= n_parts <= MAX_SPLIT or len(f) != 1 + n_parts:
        raise ProtocolError(f"SPLIT announces {n_parts} parts and carries {len(f) - 1}")
    return Split(chunk_id, list(f[1:]))


def _rack(head: bytes, f: Sequence[Any]) -> Message:
    return Rack(_ids_after(_RACK, head, f)[1])


def _ids_after(layout: struct.Struct, head: bytes, f: Sequence[Any]) -> tuple[tuple[Any, ...], tuple[int, ...]]:
    """A fixed header whose last field counts the 8-byte ids that follow it in the head frame."""
    name = Command(head[4]).name
    if len(f) != 1 or len(head) < layout.size:
        raise ProtocolError(f"{name} is one frame: a header and the ids")
    fields = layout.unpack_from(head)
    count = fields[-1]
    if count > MAX_SPLIT or len(head) != layout.size + 8 * count:
        raise ProtocolError(f"{name} announces {count} ids and carries {len(head) - layout.size} bytes")
    return fields, struct.unpack_from(f">{count}Q", head, layout.size)


def _confirms(head: bytes, f: Sequence[Any]) -> Message:
    if len(f) != 1 or len(head) < _CONFIRMS.size:
        raise ProtocolError("CONFIRMS is one frame: a header and the pairs")
    count = _CONFIRMS.unpack_from(head)[-1]
    if count > MAX_SPLIT or len(head) != _CONFIRMS.size + 16 * count:
        raise ProtocolError(f"CONFIRMS announces {count} pairs and carries {len(head) - _CONFIRMS.size} bytes")
    pairs = struct.unpack_from(f">{2 * count}Q", head, _CONFIRMS.size)
    return Confirms(pairs[0::2], pairs[1::2])


def _sync(head: bytes, f: Sequence[Any]) -> Message:
    asks = len(f) == 2 and _bytes(f[1]) == _ASK_CONSUMERS
    fields, seqs = _ids_after(_SYNC, head, f[:1] if asks else f)
    return Sync(fields[2], seqs, asks)


def _status(head: bytes, f: Sequence[Any]) -> Message:
    fields, missing = _ids_after(_STATUS, head, f[:1])
    token, ready, leased, dead, waiting, routed = fields[2:8]
    return QueueStatus(token, ready, leased, dead, waiting, routed, missing, _digests(f[1:]))


def _digests(f: Sequence[Any]) -> tuple[bytes, ...] | None:
    """A STATUS's second frame, if any: the digests of the consumers heard, 16 bytes each."""
    if not f:
        return None
    if len(f) != 1:
        raise ProtocolError("STATUS is a header and the ids, then at most the consumers heard")
    data = _bytes(f[0])
    if len(data) % _DIGEST or len(data) // _DIGEST > MAX_CONSUMERS_TOLD:
        raise ProtocolError(f"STATUS tells consumers in {len(data)} bytes: not {_DIGEST}-byte digests, or too many")
    return tuple(data[at : at + _DIGEST] for at in range(0, len(data), _DIGEST))


def _cancel(head: bytes, f: Sequence[Any]) -> Message:
    fields, indexes = _ids_after(_CANCEL, head, f)
    if any(i >= MAX_CHUNK_TASKS for i in indexes):
        raise ProtocolError(f"CANCEL names a task index beyond {MAX_CHUNK_TASKS}")
    return Cancel(fields[2], fields[3], fields[4], indexes)


def _cancelled(head: bytes, f: Sequence[Any]) -> Message:
    fields, indexes = _ids_after(_CANCELLED, head, f)
    return Cancelled(fields[2], indexes)


def _expired(head: bytes, f: Sequence[Any]) -> Message:
    _, _, seq, chunk_id, base, n = _unpack(_EXPIRED, head, f, 1)
    return Expired(seq, chunk_id, base, _n_tasks(n, head))


def _dead(head: bytes, f: Sequence[Any]) -> Message:
    _, _, chunk_id, task_id = _unpack(_LOST, head, f, 3)
    return Dead(chunk_id, task_id, f[1], _bytes(f[2])[:65536])


def _retried(head: bytes, f: Sequence[Any]) -> Message:
    if len(f) != 1 or len(head) < _RETRIED.size:
        raise ProtocolError(f"RETRIED has {len(f)} frames and a head of {len(head)} bytes")
    _, _, chunk_id, n = _RETRIED.unpack_from(head)
    if not 1 <= n <= MAX_CHUNK_TASKS or len(head) != _RETRIED.size + n * _FAILED.size:
        raise ProtocolError(f"RETRIED claims {n} tasks in a head of {len(head)} bytes")
    failed = tuple(_FAILED.iter_unpack(head[_RETRIED.size:]))
    if any(not 1 <= k <= MAX_FAILED for _, k in failed):
        raise ProtocolError(f"RETRIED says a task failed 0 or more than {MAX_FAILED} times")
    return Retried(chunk_id, failed)


def _bare(msg: Message) -> Callable[[bytes, Sequence[Any]], Message]:
    def decode_bare(head: bytes, f: Sequence[Any]) -> Message:
        if len(head) != len(VERSION) + 1 or len(f) != 1:
            raise ProtocolError(f"{type(msg).__name__.upper()} carries a header or frames, none expected")
        return msg

    return decode_bare


_DECODERS: dict[int, Callable[[bytes, Sequence[Any]], Message]] = {
    Command.PUT: _put,
    Command.PUTS: _puts,
    Command.DELIVER: _deliver,
    Command.DONE: _done,
    Command.RESULTS: _results,
    Command.CONFIRM: _confirm,
    Command.CONFIRMS: _confirms,
    Command.FETCH: lambda h, f: Fetch(_unpack(_FETCH, h, f, 1)[2]),
    Command.RETURN: lambda h, f: Return(_unpack(_ID, h, f, 1)[2]),
    Command.ACK: lambda h, f: Ack(_unpack(_ID, h, f, 1)[2]),
    Command.LOST: lambda h, f: Lost(*_unpack(_LOST, h, f, 1)[2:]),
    Command.EXPIRED: _expired,
    Command.DEAD: _dead,
    Command.SPLIT: _split,
    Command.RACK: _rack,
    Command.SYNC: _sync,
    Command.STATUS: _status,
    Command.CANCEL: _cancel,
    Command.CANCELLED: _cancelled,
    Command.READY: _bare(Ready()),
    Command.HELLO: _hello,
    Command.HEARTBEAT: _bare(Heartbeat()),
    Command.BYE: _bare(Bye()),
    Command.WHO: _bare(Who()),
    Command.RETRIED: _retried,
}


def decode(frames: Sequence[Any]) -> Message:
    """Parse the frames of one message (routing identity already removed).

    Raises
    ------
    ProtocolError
        On a wrong version, an unknown command, a header of the wrong size or a wrong frame count.
    """
    if not frames:
        raise ProtocolError("empty message")
    head = _bytes(frames[0])
    if len(head) < 5 or not head.startswith(VERSION):
        raise ProtocolError(f"unsupported protocol version in head {head[:8]!r}")
    decoder = _DECODERS.get(head[4])
    if decoder is None:
        raise ProtocolError(f"unknown command {head[4]}")
    return decoder(head, frames)


_S = TypeVar("_S")  # who sent a message: a peer's routing identity, a broker's index...
_C = TypeVar("_C")  # what else its handler is given: the round it arrived in, its socket...
_M = TypeVar("_M", bound=Message)


class Routes(Generic[_S, _C]):
    """A route table: each message type a loop accepts, to its handler.

    :meth:`add` ties a handler to its message type, so that mypy checks each handler against
    the type it is given (a handler of ``Done`` cannot be added for ``Put``). A loop reads
    :attr:`table` directly: one dict lookup and a call per message, as cheap as the first test of
    a ``type(msg) is`` chain and no dearer for the last. A type that has no route is the caller's
    to count and drop (a bad frame never stops a loop).

    Examples
    --------
    >>> seen = []
    >>> routes = Routes[str, None]().add(Fetch, lambda peer, msg, _: seen.append((peer, msg.credit)))
    >>> routes.table[Fetch]("a", Fetch(2), None)
    >>> seen, routes.table.get(Bye)
    ([('a', 2)], None)
    """

    __slots__ = ("table",)

    def __init__(self) -> None:
        self.table: dict[type[Any], Callable[[_S, Any, _C], None]] = {}

    def add(self, kind: type[_M], handler: Callable[[_S, _M, _C], None]) -> Routes[_S, _C]:
        """Route messages of type ``kind`` to ``handler``; return the table (to chain)."""
        if kind in self.table:
            raise ValueError(f"{kind.__name__} has a route already")
        self.table[kind] = handler
        return self

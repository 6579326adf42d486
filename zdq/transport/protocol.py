"""The zdq wire protocol: every frame layout in one place.

A message is a ZeroMQ multipart message::

    [VERSION, command (1 byte), header (fixed struct per command), payload frames...]

On a ROUTER socket the peer's routing identity precedes these frames. Payloads (chunks of tasks and
their results) are opaque bytes to the broker: it stores and forwards them, and never unpickles them.

Commands
--------
=========  ======================  ==========================================================
HELLO      driver/consumer→broker  role; announces a peer (payload: its display name)
PUT        driver→broker           seq, n_tasks; payload: one chunk
CONFIRM    broker→driver           seq, chunk id, status; sent once the chunk is stored
FETCH      consumer→broker         credit: how many more chunks the consumer accepts
DELIVER    broker→consumer         chunk id, n_tasks, attempt; payload: the leased chunk
DONE       consumer→broker         chunk id, n_tasks; payload: the results of the chunk
RESULTS    broker→driver           seq, chunk id, consumer id; payload: the results
RETURN     consumer→broker         chunk id; gives an unstarted leased chunk back
ACK        consumer→broker         chunk id; early acknowledgement (at most once): results follow
LOST       broker→driver           seq, chunk id; an early-acked chunk's consumer died before DONE
DEAD       consumer→broker         origin chunk id, task id; payload: the task as a chunk, reason
SPLIT      consumer→broker         chunk id, n; payload: n one-task chunks replacing a redelivered one
RACK       driver→broker           n; payload: ids of chunks whose RESULTS arrived (the broker may
                                   now forget them: until then a broker restart re-runs them)
HEARTBEAT  both ways               liveness; a consumer's heartbeat renews its leases
BYE        peer→broker             the peer leaves; its leases return at once
=========  ======================  ==========================================================
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, Union

from zdq.errors import ProtocolError

__all__ = [
    "VERSION",
    "Command",
    "Role",
    "Status",
    "Hello",
    "Put",
    "Confirm",
    "Fetch",
    "Deliver",
    "Done",
    "Results",
    "Return",
    "Ack",
    "Lost",
    "Dead",
    "Split",
    "Rack",
    "Heartbeat",
    "Bye",
    "Message",
    "encode",
    "decode",
    "ID_SIZE",
    "MAX_CHUNK_TASKS",
]

#: First frame of every message; the last byte is the protocol version.
VERSION = b"ZDQ\x01"
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


class Role(enum.IntEnum):
    DRIVER = 1
    CONSUMER = 2


class Status(enum.IntEnum):
    """Outcome carried by CONFIRM."""

    STORED = 0
    FULL = 1  # storage full: the chunk was not stored
    REFUSED = 2  # malformed or oversized: the chunk was not stored
    ERROR = 3  # any other storage failure: the chunk was not stored


@dataclass(frozen=True, slots=True)
class Hello:
    role: Role
    name: bytes = b""


@dataclass(frozen=True, slots=True)
class Put:
    seq: int
    n_tasks: int
    chunk: object  # bytes or zmq.Frame: opaque


@dataclass(frozen=True, slots=True)
class Confirm:
    seq: int
    chunk_id: int
    status: Status
    detail: bytes = b""


@dataclass(frozen=True, slots=True)
class Fetch:
    credit: int


@dataclass(frozen=True, slots=True)
class Deliver:
    chunk_id: int
    n_tasks: int
    attempt: int
    chunk: object


@dataclass(frozen=True, slots=True)
class Done:
    chunk_id: int
    n_tasks: int
    results: object


@dataclass(frozen=True, slots=True)
class Results:
    seq: int
    chunk_id: int
    consumer: bytes
    results: object


@dataclass(frozen=True, slots=True)
class Return:
    chunk_id: int


@dataclass(frozen=True, slots=True)
class Ack:
    chunk_id: int


@dataclass(frozen=True, slots=True)
class Lost:
    seq: int
    chunk_id: int


@dataclass(frozen=True, slots=True)
class Dead:
    chunk_id: int
    task_id: int
    chunk: object
    reason: bytes


@dataclass(frozen=True, slots=True)
class Split:
    chunk_id: int
    parts: Sequence[object]


@dataclass(frozen=True, slots=True)
class Rack:
    chunk_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Heartbeat:
    pass


@dataclass(frozen=True, slots=True)
class Bye:
    pass


Message = Union[Hello, Put, Confirm, Fetch, Deliver, Done, Results, Return, Ack, Lost, Dead, Split, Rack, Heartbeat, Bye]

_HELLO = struct.Struct(">B")
_PUT = struct.Struct(">QI")
_CONFIRM = struct.Struct(">QQB")
_FETCH = struct.Struct(">I")
_DELIVER = struct.Struct(">QII")
_DONE = struct.Struct(">QI")
_RESULTS = struct.Struct(">QQ16s")
_RETURN = struct.Struct(">Q")
_LOST = struct.Struct(">QQ")
_SPLIT = struct.Struct(">QI")
#: Most tasks a chunk may hold (and parts a SPLIT may carry): a peer's claim is never trusted beyond.
MAX_SPLIT = MAX_CHUNK_TASKS = 100_000
_EMPTY = b""

_CMD = {c: bytes([c]) for c in Command}


def encode(msg: Message) -> list[Any]:
    """Frames for ``msg`` (without any routing identity)."""
    if isinstance(msg, Deliver):
        return [VERSION, _CMD[Command.DELIVER], _DELIVER.pack(msg.chunk_id, msg.n_tasks, msg.attempt), msg.chunk]
    if isinstance(msg, Done):
        return [VERSION, _CMD[Command.DONE], _DONE.pack(msg.chunk_id, msg.n_tasks), msg.results]
    if isinstance(msg, Put):
        return [VERSION, _CMD[Command.PUT], _PUT.pack(msg.seq, msg.n_tasks), msg.chunk]
    if isinstance(msg, Results):
        header = _RESULTS.pack(msg.seq, msg.chunk_id, msg.consumer)
        return [VERSION, _CMD[Command.RESULTS], header, msg.results]
    if isinstance(msg, Confirm):
        header = _CONFIRM.pack(msg.seq, msg.chunk_id, msg.status)
        return [VERSION, _CMD[Command.CONFIRM], header, msg.detail]
    if isinstance(msg, Fetch):
        return [VERSION, _CMD[Command.FETCH], _FETCH.pack(msg.credit)]
    if isinstance(msg, Return):
        return [VERSION, _CMD[Command.RETURN], _RETURN.pack(msg.chunk_id)]
    if isinstance(msg, Ack):
        return [VERSION, _CMD[Command.ACK], _RETURN.pack(msg.chunk_id)]
    if isinstance(msg, Lost):
        return [VERSION, _CMD[Command.LOST], _LOST.pack(msg.seq, msg.chunk_id)]
    if isinstance(msg, Dead):
        return [VERSION, _CMD[Command.DEAD], _LOST.pack(msg.chunk_id, msg.task_id), msg.chunk, msg.reason]
    if isinstance(msg, Split):
        return [VERSION, _CMD[Command.SPLIT], _SPLIT.pack(msg.chunk_id, len(msg.parts)), *msg.parts]
    if isinstance(msg, Rack):
        ids = msg.chunk_ids
        return [VERSION, _CMD[Command.RACK], _FETCH.pack(len(ids)), struct.pack(f">{len(ids)}Q", *ids)]
    if isinstance(msg, Hello):
        return [VERSION, _CMD[Command.HELLO], _HELLO.pack(msg.role), msg.name]
    if isinstance(msg, Heartbeat):
        return [VERSION, _CMD[Command.HEARTBEAT], _EMPTY]
    if isinstance(msg, Bye):
        return [VERSION, _CMD[Command.BYE], _EMPTY]
    raise ProtocolError(f"cannot encode {type(msg).__name__}")


def _bytes(frame: object) -> bytes:
    # zmq.Frame exposes .bytes; plain bytes pass through.
    data = getattr(frame, "bytes", frame)
    if not isinstance(data, bytes):
        raise ProtocolError(f"frame of type {type(frame).__name__} is not bytes")
    return data


def _unpack(layout: struct.Struct, frame: object, command: Command) -> tuple[int, ...]:
    raw = _bytes(frame)
    if len(raw) != layout.size:
        raise ProtocolError(f"{command.name} header has {len(raw)} bytes, expected {layout.size}")
    return layout.unpack(raw)


def _n_tasks(n: int, command: Command) -> int:
    if not 1 <= n <= MAX_CHUNK_TASKS:
        raise ProtocolError(f"{command.name} claims {n} tasks; a chunk holds 1 to {MAX_CHUNK_TASKS}")
    return n


def decode(frames: Sequence[Any]) -> Message:
    """Parse the frames of one message (routing identity already removed).

    Raises
    ------
    ProtocolError
        On a wrong version, an unknown command, a header of the wrong size or a wrong frame count.
    """
    if len(frames) < 3:
        raise ProtocolError(f"message has {len(frames)} frames, at least 3 expected")
    version = _bytes(frames[0])
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version frame {version[:8]!r}")
    raw_cmd = _bytes(frames[1])
    if len(raw_cmd) != 1:
        raise ProtocolError("command frame must be exactly one byte")
    try:
        command = Command(raw_cmd[0])
    except ValueError:
        raise ProtocolError(f"unknown command {raw_cmd[0]}") from None
    if command is Command.SPLIT:
        chunk_id, n_parts = _unpack(_SPLIT, frames[2], command)
        if not 1 <= n_parts <= MAX_SPLIT or len(frames) != 3 + n_parts:
            raise ProtocolError(f"SPLIT announces {n_parts} parts and carries {len(frames) - 3}")
        return Split(chunk_id, list(frames[3:]))
    short = (Command.FETCH, Command.RETURN, Command.ACK, Command.LOST, Command.HEARTBEAT, Command.BYE)
    expected = 3 if command in short else 5 if command is Command.DEAD else 4
    if len(frames) != expected:
        raise ProtocolError(f"{command.name} has {len(frames)} frames, expected {expected}")
    header = frames[2]
    if command is Command.DELIVER:
        chunk_id, n_tasks, attempt = _unpack(_DELIVER, header, command)
        return Deliver(chunk_id, _n_tasks(n_tasks, command), attempt, frames[3])
    if command is Command.DONE:
        chunk_id, n_tasks = _unpack(_DONE, header, command)
        return Done(chunk_id, _n_tasks(n_tasks, command), frames[3])
    if command is Command.PUT:
        seq, n_tasks = _unpack(_PUT, header, command)
        return Put(seq, _n_tasks(n_tasks, command), frames[3])
    if command is Command.RESULTS:
        raw = _bytes(header)
        if len(raw) != _RESULTS.size:
            raise ProtocolError(f"RESULTS header has {len(raw)} bytes, expected {_RESULTS.size}")
        seq, chunk_id, consumer = _RESULTS.unpack(raw)
        return Results(seq, chunk_id, consumer, frames[3])
    if command is Command.CONFIRM:
        seq, chunk_id, status = _unpack(_CONFIRM, header, command)
        try:
            return Confirm(seq, chunk_id, Status(status), _bytes(frames[3]))
        except ValueError:
            raise ProtocolError(f"unknown CONFIRM status {status}") from None
    if command is Command.FETCH:
        (credit,) = _unpack(_FETCH, header, command)
        return Fetch(credit)
    if command is Command.RETURN:
        (chunk_id,) = _unpack(_RETURN, header, command)
        return Return(chunk_id)
    if command is Command.ACK:
        (chunk_id,) = _unpack(_RETURN, header, command)
        return Ack(chunk_id)
    if command is Command.LOST:
        seq, chunk_id = _unpack(_LOST, header, command)
        return Lost(seq, chunk_id)
    if command is Command.RACK:
        (count,) = _unpack(_FETCH, header, command)
        raw = _bytes(frames[3])
        if count > MAX_SPLIT or len(raw) != 8 * count:
            raise ProtocolError(f"RACK announces {count} ids and carries {len(raw)} bytes")
        return Rack(struct.unpack(f">{count}Q", raw))
    if command is Command.DEAD:
        chunk_id, task_id = _unpack(_LOST, header, command)
        return Dead(chunk_id, task_id, frames[3], _bytes(frames[4])[:65536])
    if command is Command.HELLO:
        (role,) = _unpack(_HELLO, header, command)
        try:
            return Hello(Role(role), _bytes(frames[3])[:256])
        except ValueError:
            raise ProtocolError(f"unknown role {role}") from None
    if _bytes(header):
        raise ProtocolError(f"{command.name} carries a header, none expected")
    return Heartbeat() if command is Command.HEARTBEAT else Bye()

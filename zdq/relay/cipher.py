"""What the tunnel and its Relay actor say to each other over Dask's comm is encrypted.

Why
---
The relay's batches cross Dask's comm (driver -> scheduler -> worker and back). On a ``tcp://``
Dask cluster that comm is clear text, and a payload's seal (:mod:`zdq.codec.results`) is a MAC,
not encryption: without this module a passive observer of that hop reads every task's arguments
and results. The pool's CURVE keys (:mod:`zdq.transport.security`) cannot be the secret here: they
reach the actors as arguments over that same comm. So the tunnel and each relay agree keys of
their own, and only public keys ever cross.

The protocol
------------
1. The tunnel makes an ephemeral X25519 key pair (a :class:`KeyOffer`) and calls
   ``Relay.hello(its public key)``; the relay makes its own, keeps the session and answers with its
   public key. Each relay (each generation of the path) is a new agreement: a session's keys die
   with its relay (forward secrecy against an observer who records now and learns the pool's keys
   later).
2. HKDF-SHA256 turns the shared secret into two 32-byte keys, one per direction. Its salt is the
   pool's CURVE client secret (binding the session to the pool; it protects nothing on its own,
   having crossed the comm too); its info binds the pool's name, the driver's identity and both
   public keys.
3. Every batch, either way, is sealed with AES-256-GCM: a 12-byte header (``ZR``, version,
   direction, an 8-byte counter) authenticated as associated data, the nonce made of the counter.
   A receiver takes only an authentic batch with the next counter of its direction: a batch sealed
   for the other direction, tampered with, or after a gap raises :class:`~zdq.errors.ProtocolError` (the caller
   fails that relay: a new one, with new keys, replaces it, and the driver's protocol recovers
   what was in flight); a batch already taken (a replay) raises :class:`ReplayedBatch`, and is
   dropped with a log line.

This protects against a passive observer. An active man in the middle of an unencrypted Dask comm
can answer ``hello`` himself (nothing authenticates the public keys, as nothing on such a comm
can); against him, run Dask itself over ``tls://``.

What is sealed: a push is a list of ``(slot, frames)`` (a message) and ``(slot, (gen, endpoint))``
(connect that slot anew); a pull is a list of ``(slot, gen, frames)``. They are packed with msgpack
(a dependency of distributed), which builds only plain values from what it reads, never objects.

Who owns what
-------------
A :class:`RelaySession` holds two counters: the sending one belongs to the one thread that seals
(the tunnel's pusher; the relay's event loop, in ``pull``), the receiving one to the one thread
that opens (the tunnel's puller; the relay's event loop, in ``push``). It takes no lock.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from zdq.errors import ProtocolError

__all__ = [  # noqa: RUF022 - grouped by role
    # agreeing keys
    "Side",
    "KeyOffer",
    "RelaySession",
    "ReplayedBatch",
    # what is sealed
    "pack_push",
    "unpack_push",
    "pack_pull",
    "unpack_pull",
]

_MAGIC = b"ZR"
_VERSION = 1
_HEADER = struct.Struct(">2sBBQ")  # magic, version, direction, counter: 12 bytes
_INFO = b"zdq relay v1"
_PUBLIC_BYTES = 32


class Side(IntEnum):
    """Who seals: the driver's tunnel or the Relay actor (the direction byte of a batch)."""

    DRIVER = 1
    RELAY = 2

    @property
    def other(self) -> Side:
        return Side.RELAY if self is Side.DRIVER else Side.DRIVER


class ReplayedBatch(ProtocolError):
    """A batch whose counter was already taken: a replay, dropped (the session goes on)."""


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class KeyOffer:
    """One side's ephemeral X25519 key pair, until :meth:`agree` turns it into a session.

    >>> driver, relay = KeyOffer(), KeyOffer()
    >>> d = driver.agree(relay.public, Side.DRIVER, pool="p", identity=b"i", pool_secret=b"s")
    >>> r = relay.agree(driver.public, Side.RELAY, pool="p", identity=b"i", pool_secret=b"s")
    >>> r.open(d.seal(b"hello"))
    b'hello'
    """

    def __init__(self) -> None:
        self._private: X25519PrivateKey | None = X25519PrivateKey.generate()
        self.public = _raw(self._private.public_key())

    def __repr__(self) -> str:  # never print a secret
        return f"KeyOffer(public={self.public.hex()[:16]}..., private=<hidden>)"

    def agree(self, peer_public: bytes, side: Side, *, pool: str, identity: bytes, pool_secret: bytes | None) -> RelaySession:
        """The session of ``side`` with the peer whose public key is ``peer_public``. Once: the
        private key is forgotten, so that it cannot serve a second session.

        Raises :class:`~zdq.errors.ProtocolError` when ``peer_public`` is not an X25519 public key
        (or one that gives no secret: a low-order point)."""
        if self._private is None:
            raise ProtocolError("this key offer already made its session: make a new KeyOffer for a new relay")
        if not isinstance(peer_public, bytes) or len(peer_public) != _PUBLIC_BYTES:
            raise ProtocolError(f"the relay's key agreement takes a {_PUBLIC_BYTES}-byte X25519 public key, got {peer_public!r:.80}")
        private, self._private = self._private, None
        try:
            shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as e:  # a low-order point: the shared secret would be all zeros
            raise ProtocolError(f"the relay's peer sent an unusable X25519 public key: {e}") from e
        driver_public, relay_public = (self.public, peer_public) if side is Side.DRIVER else (peer_public, self.public)
        info = b"\0".join((_INFO, pool.encode(), identity, driver_public, relay_public))
        keys = HKDF(algorithm=hashes.SHA256(), length=64, salt=pool_secret or None, info=info).derive(shared)
        to_relay, to_driver = keys[:32], keys[32:]
        send, receive = (to_relay, to_driver) if side is Side.DRIVER else (to_driver, to_relay)
        return RelaySession(side, send, receive)


class RelaySession:
    """The agreed keys of one side of one relay, and its two counters. Made by :meth:`KeyOffer.agree`."""

    def __init__(self, side: Side, send_key: bytes, receive_key: bytes) -> None:
        self.side = side
        self._send = AESGCM(send_key)
        self._receive = AESGCM(receive_key)
        self._sent = 0  # the counter of the next batch sealed
        self._expected = 0  # the counter of the next batch opened

    def __repr__(self) -> str:
        return f"RelaySession(side={self.side.name}, sent={self._sent}, opened={self._expected}, keys=<hidden>)"

    def seal(self, plaintext: bytes) -> bytes:
        """``plaintext`` encrypted and authenticated for the other side, with the next counter."""
        header = _HEADER.pack(_MAGIC, _VERSION, self.side, self._sent)
        self._sent += 1
        return header + self._send.encrypt(_nonce(header), plaintext, header)

    def open(self, sealed: bytes) -> bytes:
        """The plaintext of a batch the other side sealed, if it is the next one.

        Raises :class:`ReplayedBatch` for a batch already opened (drop it and go on), and
        :class:`~zdq.errors.ProtocolError` for anything else that is not the next batch of the
        other side, intact (fail the relay: its path is broken or tampered with)."""
        if not isinstance(sealed, (bytes, bytearray, memoryview)) or len(sealed) < _HEADER.size + 16:
            raise ProtocolError(f"a sealed relay batch is bytes of at least {_HEADER.size + 16}, got {sealed!r:.80}")
        view = memoryview(sealed)  # no copy of the batch until its plaintext
        header = bytes(view[: _HEADER.size])
        magic, version, direction, counter = _HEADER.unpack(header)
        if magic != _MAGIC or version != _VERSION:
            raise ProtocolError(f"not a sealed relay batch of version {_VERSION} (header {header.hex()})")
        if direction != self.side.other:
            raise ProtocolError(
                f"a relay batch sealed by the {_side_name(direction)} came to the {self.side.name.lower()}: "
                "batches are sealed for one direction"
            )
        try:  # authenticated first: a forged batch is told as such, whatever counter it claims
            plaintext = self._receive.decrypt(_nonce(header), view[_HEADER.size :], header)
        except InvalidTag as e:
            raise ProtocolError(
                f"relay batch {counter} from the {_side_name(direction)} failed authentication: it was altered on the way, "
                "or sealed with other keys"
            ) from e
        if counter < self._expected:
            raise ReplayedBatch(f"relay batch {counter} was already taken (the next is {self._expected}): a replay, dropped")
        if counter > self._expected:
            raise ProtocolError(f"relay batch {counter} came where {self._expected} was next: batches were lost on the way")
        self._expected += 1
        return plaintext


def _nonce(header: bytes) -> bytes:
    # The counter is unique per key (each direction has its own key), so is the nonce.
    return b"\0\0\0\0" + header[4:]


def _side_name(direction: int) -> str:
    try:
        return Side(direction).name.lower()
    except ValueError:
        return f"unknown side {direction}"


# -- what is sealed ----------------------------------------------------------------------------------
def pack_push(items: list[tuple[int, Any]]) -> bytes:
    """A push's items as bytes: ``(slot, frames)`` as ``[slot, frames]``, ``(slot, (gen, endpoint))``
    as ``[slot, gen, endpoint]``."""
    return msgpack.packb(
        [(slot, *x) if isinstance(x, tuple) else (slot, x) for slot, x in items], use_bin_type=True
    )


def unpack_push(data: bytes) -> list[tuple[int, Any]]:
    """The items :func:`pack_push` packed (their shape is checked by the relay, not here)."""
    out: list[tuple[int, Any]] = []
    for entry in _unpack_list(data, "push"):
        if isinstance(entry, list) and len(entry) == 2:
            out.append((entry[0], entry[1]))
        elif isinstance(entry, list) and len(entry) == 3:
            out.append((entry[0], (entry[1], entry[2])))
        else:
            raise ProtocolError(f"a relay push holds [slot, frames] and [slot, gen, endpoint] entries, got {entry!r:.80}")
    return out


def pack_pull(entries: list[tuple[int, int, list[bytes]]]) -> bytes:
    """A pull's ``(slot, gen, frames)`` entries as bytes."""
    return msgpack.packb(entries, use_bin_type=True)


def unpack_pull(data: bytes) -> list[tuple[int, int, list[bytes]]]:
    """The entries :func:`pack_pull` packed, checked: a bad one raises :class:`~zdq.errors.ProtocolError`."""
    out: list[tuple[int, int, list[bytes]]] = []
    for entry in _unpack_list(data, "pull"):
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], int)
            and isinstance(entry[1], int)
            and isinstance(entry[2], list)
            and all(isinstance(f, bytes) for f in entry[2])
        ):
            raise ProtocolError(f"a relay pull holds [slot, gen, [frame bytes, ...]] entries, got {entry!r:.80}")
        out.append((entry[0], entry[1], entry[2]))
    return out


def _unpack_list(data: bytes, what: str) -> list[Any]:
    try:
        entries = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as e:  # msgpack raises several types for bad input; all mean the same here
        raise ProtocolError(f"a relay {what} did not decode: {type(e).__name__}: {e}") from e
    if not isinstance(entries, list):
        raise ProtocolError(f"a relay {what} is a list, got {type(entries).__name__}")
    return entries

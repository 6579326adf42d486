"""Sealing payloads: the tag that proves a chunk or its results were written by a member of the pool.

When a pool is authenticated, every payload (a chunk, a chunk's results) is sealed by its author
(driver or consumer) with the pool's payload key and checked by its reader *before* unpickling:
the broker in between cannot forge one, and bytes from any other peer are refused unread.

The tag is AES-256-GCM's (a GMAC: the payload is the associated data, nothing is encrypted),
which AES-NI and carry-less multiplication make cheaper than the keyed BLAKE2b tag it replaces
(protocol 6 and before; 7 since): for a chunk of 1,000 no-ops (4.9 KB), :func:`seal` 1.4 and
:func:`unseal` 1.9 µs against 5.7 and 5.8 (the tag itself 0.8 µs), and four payloads of that size
cross each chunk's path (the chunk and its results, each sealed once and checked once: issue 26,
point 5).

GCM must never see one nonce twice under one key, and every driver and consumer of a pool seals
with the same payload key. So a sealer does not use that key itself: each process draws a random
16-byte *salt* (again in a forked child) and seals under ``BLAKE2b(salt, key=payload key)``, with
a counter as its nonce. Two sealers share a key only if they drew the same salt (2^-128 a pair),
and a counter repeats only after 2^64 seals. A sealed payload is::

    MAGIC (2 bytes) | salt (16) | counter (8, big-endian) | GMAC tag (16) | data

The reader derives the salt's key once and keeps it (:data:`_OPENERS`, bounded). Payloads sealed
before (a durable queue's, kept across an upgrade: ``BLAKE2b(data, key)`` (16 bytes) | data) are
still read: a payload that is not a valid new seal is checked as one of those. Payloads under 512
bytes (BLAKE2b is cheaper there: a single task's chunk) and over 2 GiB (beyond what cryptography's
AES-GCM takes) are still sealed that way.

State: one sealer per payload key in this process, and the readers' derived keys; both are only
caches of what the key and the salts determine (forgotten in a forked child).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os
import struct
import threading
from typing import Any

from zdq.errors import ProtocolError

__all__ = ["OVERHEAD", "seal", "unseal"]

MAGIC = b"\xa7\x01"
_SALT = 16
_COUNTER = struct.Struct(">4xQ")  # the GCM nonce (12 bytes): 4 zero bytes and the counter
_TAG = 16
_HEAD = len(MAGIC) + _SALT + 8
#: Bytes a seal adds to its data.
OVERHEAD = _HEAD + _TAG
_PERSON = b"zdq-seal-gmac"
_OLD_TAG = 16  # the keyed BLAKE2b tag of protocol 6 and before
#: The payloads sealed with GCM: from the size where it costs less than BLAKE2b (a single task's
#: chunk or results: 1.0 against 0.7 µs to seal, 1.6 against 0.9 to check) to the largest that
#: cryptography's AES-GCM takes (max-message-size allows more); the others get the earlier BLAKE2b
#: tag, which :func:`unseal` reads as well.
_GCM_MIN = 512
_GCM_MAX = 2**31 - 1
#: Derived keys kept for reading (a process reads from a few sealers: its pool's drivers and consumers).
_MAX_OPENERS = 4096


_InvalidTag: Any = None  # cryptography's, set with the first key (an unauthenticated pool seals nothing)


def _aead(key: bytes, salt: bytes) -> Any:
    global _InvalidTag
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    _InvalidTag = InvalidTag
    return AESGCM(hashlib.blake2b(salt, key=key, digest_size=32, person=_PERSON).digest())


class _Sealer:
    """What this process seals with under one payload key: a salt of its own, its derived key,
    and the counter (``next`` on an :func:`itertools.count` is atomic: threads may share it)."""

    __slots__ = ("aead", "count", "head")

    def __init__(self, key: bytes) -> None:
        salt = os.urandom(_SALT)
        self.aead = _aead(key, salt)
        self.head = MAGIC + salt
        self.count = itertools.count()


_lock = threading.Lock()
_SEALERS: dict[bytes, _Sealer] = {}
_OPENERS: dict[tuple[bytes, bytes], Any] = {}


def _forget() -> None:
    """In a forked child: its parent's salts are its parent's (their counters would repeat)."""
    global _lock
    _lock = threading.Lock()
    _SEALERS.clear()
    _OPENERS.clear()


os.register_at_fork(after_in_child=_forget)


def _sealer(key: bytes) -> _Sealer:
    with _lock:
        sealer = _SEALERS.get(key)
        if sealer is None:
            sealer = _SEALERS[key] = _Sealer(key)
        return sealer


def _old_tag(key: bytes, data: Any) -> bytes:
    """The keyed BLAKE2b tag: protocol 6's for every payload, and still written for payloads
    outside GCM's sizes."""
    return hashlib.blake2b(data, key=key, digest_size=_OLD_TAG).digest()


def seal(key: bytes | None, data: bytes) -> bytes:
    """``data`` prefixed with its seal (``data`` itself without a key)."""
    if key is None:
        return data
    if type(key) is not bytes:  # a bytearray or a view: the sealers are kept by key
        key = bytes(key)
    if not _GCM_MIN <= len(data) <= _GCM_MAX:  # small (cheaper so), or beyond what AES-GCM takes
        return _old_tag(key, data) + data
    sealer = _SEALERS.get(key) or _sealer(key)
    nonce = _COUNTER.pack(next(sealer.count))
    return b"".join((sealer.head, nonce[4:], sealer.aead.encrypt(nonce, b"", data), data))


def _opener(key: bytes, salt: bytes) -> Any:
    aead = _aead(key, salt)
    with _lock:
        if len(_OPENERS) >= _MAX_OPENERS:  # salts come from peers: never an unbounded cache
            _OPENERS.clear()
        _OPENERS[(key, salt)] = aead
    return aead


def _opens(key: bytes, view: memoryview) -> bool:
    """Whether ``view`` is a payload sealed under ``key`` by :func:`seal`."""
    head = bytes(view[:_HEAD])
    if len(view) < OVERHEAD or head[: len(MAGIC)] != MAGIC:
        return False
    salt = head[len(MAGIC) : len(MAGIC) + _SALT]
    aead = _OPENERS.get((key, salt)) or _opener(key, salt)
    try:
        aead.decrypt(b"\0\0\0\0" + head[len(MAGIC) + _SALT :], view[_HEAD:OVERHEAD], view[OVERHEAD:])
    except _InvalidTag:
        return False
    return True


def unseal(key: bytes | None, payload: Any) -> memoryview:
    """The data of a sealed payload (any buffer: what a socket hands over).

    Raises
    ------
    ProtocolError
        (a ``ValueError``) The payload is too short to carry a tag, or its tag does not match:
        it was not written by a member of this pool.
    """
    view = memoryview(payload)
    if key is None:
        return view
    if type(key) is not bytes:  # as seal()
        key = bytes(key)
    if view.format != "B":  # a view of other items (cryptography takes bytes): its bytes, in order
        try:
            view = view.cast("B")
        except TypeError as e:  # not contiguous: no payload a socket or storage hands over
            raise ProtocolError(f"a sealed payload must be contiguous bytes: {e}") from None
    if _opens(key, view):
        return view[OVERHEAD:]
    if len(view) < _OLD_TAG:
        raise ProtocolError(f"payload of {len(view)} bytes is too short to carry its tag")
    data = view[_OLD_TAG:]
    if not hmac.compare_digest(_old_tag(key, data), view[:_OLD_TAG]):
        raise ProtocolError("payload tag does not match: not written by a member of this pool")
    return data

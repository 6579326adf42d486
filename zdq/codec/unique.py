"""Unique tasks' keys, checked where they are given, and the one message a broker words for them.

``submit(fn, unique_key="user-42-report", unique_for=60)``: :func:`unique_timing` checks both
keywords at the call and puts them in the submission's :class:`~zdq.codec.timing.Timing`, which
carries them to the broker (the PUT's tags). The broker's side is :mod:`zdq.broker.unique`; the
driver's, :mod:`zdq.client.driver.ledger` (the queue that owns a key) and ``loop`` (the answers).

>>> unique_timing(None, "user-42-report", 1.5).unique_key
b'user-42-report'
>>> parse_held(held_detail(b"k", 12.5))[0]
12.5
"""

from __future__ import annotations

import dataclasses
from typing import Any

from zdq.codec.timing import Timing, _seconds

__all__ = ["MAX_KEY", "held_detail", "parse_held", "unique_timing"]

#: The longest unique key in bytes: the wire's (``zdq.transport.protocol.MAX_KEY``; the codec does
#: not import the transport, a unit test keeps the two equal).
MAX_KEY = 1024


def unique_timing(timing: Timing | None, unique_key: Any, unique_for: Any) -> Timing:
    """``timing`` (or a plain one) with a unique key and its window.

    Raises
    ------
    TypeError
        ``unique_key`` is not a string, or ``unique_for`` not a number of seconds or a timedelta.
    ValueError
        ``unique_key`` is empty or longer than 1024 bytes in UTF-8; ``unique_for`` is negative or
        not finite, or given without ``unique_key``.
    """
    if unique_key is None:
        raise ValueError("unique_for= needs a unique_key=: the window holds that key")
    if not isinstance(unique_key, str):
        raise TypeError(f"unique_key must be a str, got {type(unique_key).__name__} {unique_key!r:.80}")
    key = unique_key.encode()
    if not key or len(key) > MAX_KEY:
        raise ValueError(f"unique_key must be 1 to {MAX_KEY} bytes in UTF-8, got {len(key)}: {unique_key!r:.80}")
    # The window is checked as a delay is (seconds or a timedelta, finite, not negative).
    window = 0.0 if unique_for is None else _seconds(unique_for, "unique_for")
    return dataclasses.replace(timing or Timing(), unique_key=key, unique_for=window)


def held_detail(key: bytes, free_at: float) -> bytes:
    """A CONFIRM UNIQUE_HELD's detail: when the key is free, then why (see :func:`parse_held`)."""
    why = f"unique key {key.decode(errors='replace')!r} is held by a task that ended, until its unique_for window passes"
    return f"{free_at:.6f} {why}".encode()


def parse_held(detail: bytes) -> tuple[float, str]:
    """``(free at, why)`` of :func:`held_detail`'s bytes (``(0.0, the text)`` if not such bytes)."""
    text = detail.decode(errors="replace")
    at, _, why = text.partition(" ")
    try:
        return float(at), why
    except ValueError:
        return 0.0, text

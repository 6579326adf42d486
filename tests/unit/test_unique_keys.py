"""Unique tasks' pure parts: the keywords' checks, the broker's key index (holders, followers,
windows) and the driver's pinned records, with no socket and no thread."""

from __future__ import annotations

import datetime
import time
from typing import Any

import pytest

from zdq.broker.unique import UniqueKeys
from zdq.client.driver.ledger import Ledger, queue_of_key
from zdq.codec.tasks import PICKLED, dumps_task
from zdq.codec.timing import Timing
from zdq.codec.unique import MAX_KEY, held_detail, parse_held, unique_timing
from zdq.config import settings
from zdq.storage.base import ChunkMeta
from zdq.transport import protocol as p

pytestmark = pytest.mark.unit

DRIVER_A, DRIVER_B = b"a" * 16, b"b" * 16


class Sent(list[tuple[bytes, Any]]):
    """What a UniqueKeys sent, in order (a peer that takes everything unless ``refuse``)."""

    refuse = False

    def __call__(self, ident: bytes, msg: Any) -> bool:
        if self.refuse:
            return False
        self.append((ident, msg))
        return True


def put(seq: int, key: bytes = b"", unique_for: float = 0.0) -> p.Put:
    return p.Put(seq, 1, b"chunk", 0.0, 0, 100 + seq, 0.0, b"", 0.0, key, unique_for)


def test_unique_timing_checks_its_keywords_and_keeps_the_rest_of_the_timing() -> None:
    t = unique_timing(Timing(priority=3), "k", datetime.timedelta(seconds=2))
    assert (t.priority, t.unique_key, t.unique_for) == (3, b"k", 2.0)
    assert unique_timing(None, "k", None).unique_for == 0.0
    for bad, error in [("", ValueError), ("x" * 1025, ValueError), (b"k", TypeError), (None, ValueError)]:
        with pytest.raises(error):
            unique_timing(None, bad, 1.0)
    for window, error in [(-1, ValueError), (float("inf"), ValueError), ("1", TypeError), (True, TypeError)]:
        with pytest.raises(error):
            unique_timing(None, "k", window)
    assert parse_held(held_detail(b"k", 5.25)) == (5.25, parse_held(held_detail(b"k", 5.25))[1])
    assert MAX_KEY == p.MAX_KEY
    assert parse_held(b"no time here") == (0.0, "no time here")


def test_a_held_key_turns_later_puts_into_followers_that_get_the_holders_results() -> None:
    sent = Sent()
    keys = UniqueKeys([], sent, keep_for=60)
    puts = [(DRIVER_A, put(1, b"k")), (DRIVER_A, put(2)), (DRIVER_B, put(3, b"k"))]
    keep, same_round = keys.admit(puts, time.time())
    assert [q.seq for _, q in keep] == [1, 2]  # the plain PUT and the first with the key
    assert same_round == [(DRIVER_B, puts[2][1], 0)]
    keys.stored(keep, [70, 71], same_round, time.time())
    assert keys.holders == {b"k": 70}
    assert sent == [(DRIVER_B, p.Confirm(3, 70, p.Status.DUPLICATE))]
    keep, _ = keys.admit([(DRIVER_B, put(4, b"k"))], time.time())  # a later round: follows too
    assert keep == []
    keys.ended(70, b"consumer", b"results")
    assert sent[-2:] == [(DRIVER_B, p.Results(3, 70, b"consumer", b"results")), (DRIVER_B, p.Results(4, 70, b"consumer", b"results"))]
    assert keys.holders == {} and keys.followers == {}
    keep, _ = keys.admit([(DRIVER_A, put(5, b"k"))], time.time())  # free again: stored
    assert len(keep) == 1


def test_a_window_holds_the_key_after_its_chunk_ended_and_lost_chunks_reach_their_followers() -> None:
    sent = Sent()
    keys = UniqueKeys([(9, ChunkMeta(DRIVER_A, 1, 1, unique_key=b"w", unique_for=60.0))], sent, keep_for=60)
    assert keys.holders == {b"w": 9}  # rebuilt from what the queue stored
    keys.admit([(DRIVER_B, put(2, b"w"))], time.time())
    keys.lost(9)
    assert sent[-1] == (DRIVER_B, p.Lost(2, 9))
    keep, _ = keys.admit([(DRIVER_B, put(3, b"w"))], time.time())
    assert keep == []
    _, msg = sent[-1]
    assert msg.status is p.Status.UNIQUE_HELD and parse_held(msg.detail)[0] > time.time() + 50
    keep, _ = keys.admit([(DRIVER_B, put(4, b"w"))], time.time() + 61)  # the window passed
    assert len(keep) == 1


def test_messages_a_follower_cannot_take_now_are_sent_again_at_housekeeping() -> None:
    sent = Sent()
    keys = UniqueKeys([], sent, keep_for=60)
    keep, _ = keys.admit([(DRIVER_A, put(1, b"k"))], time.time())
    keys.stored(keep, [5], [], time.time())
    keys.admit([(DRIVER_B, put(2, b"k"))], time.time())
    sent.refuse = True
    keys.ended(5, b"c", b"r")
    sent.refuse = False
    keys.housekeeping()
    assert sent[-1] == (DRIVER_B, p.Results(2, 5, b"c", b"r"))


def test_the_ledger_pins_a_unique_tasks_chunk_to_the_queue_of_its_key() -> None:
    ledger = Ledger("p", ["q0", "q1", "q2"], settings(window=2, chunk_size=4))
    key = b"user-42-report"
    b = queue_of_key(key, 3)
    base = ledger.reserve(1)
    [(first, n, payload)] = ledger.chunking.pack(base, [dumps_task((print, ()))], None, PICKLED, None)
    ledger.submit_chunk(first, n, payload, None, 0, timeout=0, timing=Timing(unique_key=key))
    assert not ledger.queued and list(ledger.pinned) == [b]
    assert ledger.take_pinned((b + 1) % 3) is None
    rec = ledger.take_pinned(b)
    assert rec is not None and rec.broker == b and not ledger.pinned
    ledger.requeue(b)  # its broker was lost before it confirmed: it waits for that broker again
    assert list(ledger.pinned) == [b] and not ledger.queued
    rec = ledger.take_pinned(b)
    assert rec is not None
    ledger.confirm(rec.seq, b, True, 70, follows=True)  # follows chunk 70: its payload is kept
    assert rec.payload is not None and ledger.buffered_chunks == 0
    assert ledger.follow_again(b, {rec.seq, 999}) == {rec.seq}  # the recovered queue lost it: sent again
    assert list(ledger.pinned) == [b] and ledger.buffered_chunks == 1


def test_a_followers_task_id_points_at_its_holders_until_the_holder_ends() -> None:
    sent, released = Sent(), []
    keys = UniqueKeys([], sent, keep_for=60)
    keys.on_release = lambda follower, holder: released.append((follower, holder))
    kept, same_round = keys.admit([(DRIVER_A, put(1, b"k")), (DRIVER_B, put(2, b"k"))], time.time())
    keys.stored(kept, [7], same_round, time.time())
    keys.admit([(DRIVER_B, put(3, b"k"))], time.time())
    assert keys.following == {102: 101, 103: 101}  # each follower's own id (its PUT's base) -> the holder's
    keys.ended(7, DRIVER_A, b"results")
    assert keys.following == {} and released == [(102, 101), (103, 101)]

"""Delays and priorities without a cluster: the checks at the call, the order objects, the wire
(the storage behaviour is in test_storage.py, over both backends)."""

from __future__ import annotations

import datetime
import math
import struct
import time

import pytest

from zdq.codec.timing import Timing, timing_of
from zdq.errors import ProtocolError
from zdq.storage.order import Delayed, ReadyQueue
from zdq.transport import protocol as p

UTC = datetime.timezone.utc


# -- the checks at the call --------------------------------------------------------------------
def test_no_keyword_given_means_no_timing_so_the_plain_path_is_taken() -> None:
    assert timing_of(None, None, None) is None
    assert timing_of(None, None, 0) is None


def test_a_delay_becomes_a_wall_clock_time_measured_at_the_call() -> None:
    before = time.time()
    timing = timing_of(2.5, None, None)
    assert timing is not None and before + 2.5 <= timing.not_before <= time.time() + 2.5
    assert timing_of(datetime.timedelta(seconds=1), None, None).not_before > before  # type: ignore[union-attr]


def test_an_aware_eta_is_its_own_wall_clock_time() -> None:
    eta = datetime.datetime(2030, 1, 1, 12, tzinfo=UTC)
    assert timing_of(None, eta, 3) == Timing(eta.timestamp(), 3)


@pytest.mark.parametrize(
    ("delay", "eta", "priority", "error", "named"),
    [
        (-1, None, None, ValueError, "delay"),
        (math.nan, None, None, ValueError, "delay"),
        (math.inf, None, None, ValueError, "delay"),
        ("5", None, None, TypeError, "delay"),
        (True, None, None, TypeError, "delay"),
        (None, datetime.datetime(2030, 1, 1), None, ValueError, "eta"),
        (None, 1_900_000_000, None, TypeError, "eta"),
        (1, datetime.datetime(2030, 1, 1, tzinfo=UTC), None, ValueError, "delay or eta"),
        (None, None, 1.5, TypeError, "priority"),
        (None, None, "high", TypeError, "priority"),
        (None, None, True, TypeError, "priority"),
        (None, None, 2**31, ValueError, "priority"),
    ],
)
def test_bad_timing_keywords_raise_an_error_naming_the_argument(
    delay: object, eta: object, priority: object, error: type[Exception], named: str
) -> None:
    with pytest.raises(error, match=named):
        timing_of(delay, eta, priority)


# -- the order objects -------------------------------------------------------------------------
def test_ready_chunks_are_served_by_priority_then_first_in_first_out() -> None:
    ready = ReadyQueue()
    for chunk_id, priority in [(1, 0), (2, -5), (3, 7), (4, 0), (5, 7), (6, 100)]:
        ready.append(chunk_id, priority)
    ready.appendleft(7, 0)  # given back: at the head of its priority
    assert [ready.popleft() for _ in range(len(ready))] == [6, 3, 5, 7, 1, 4, 2]
    assert not ready
    with pytest.raises(IndexError):
        ready.popleft()


def test_a_ready_chunk_removed_from_the_middle_leaves_the_order_of_the_others() -> None:
    ready = ReadyQueue()
    for chunk_id in range(5):
        ready.append(chunk_id, chunk_id % 2)
    ready.remove(3, 1)
    with pytest.raises(ValueError):
        ready.remove(3, 1)
    assert [ready.popleft() for _ in range(len(ready))] == [1, 0, 2, 4]


def test_delayed_chunks_come_out_in_release_order_and_a_discarded_one_never() -> None:
    delayed = Delayed()
    for chunk_id, at in [(1, 30.0), (2, 10.0), (3, 20.0), (4, 20.0)]:
        delayed.add(chunk_id, at, 10)
    assert delayed.next_at == 10.0 and delayed.tasks == 40
    assert delayed.discard(2, 10) and not delayed.discard(2, 10)
    assert delayed.due(15.0) == []  # 2 was discarded: its stale entry is skipped
    assert delayed.next_at == 20.0
    assert delayed.due(20.0) == [3, 4]
    assert delayed.due(1e9) == [1] and delayed.next_at == math.inf and len(delayed) == 0


# -- the wire ----------------------------------------------------------------------------------
def test_a_plain_put_keeps_its_head_and_a_timed_one_carries_time_and_priority() -> None:
    plain = p.encode(p.Put(1, 10, b"chunk", base=5))
    timed = p.encode(p.Put(2, 10, b"chunk", 1_800_000_000.25, -3, 5))
    assert len(plain) == len(timed) == 2
    assert len(timed[0]) == len(plain[0]) + 12
    assert p.decode(plain) == p.Put(1, 10, b"chunk", base=5)
    assert p.decode(timed) == p.Put(2, 10, b"chunk", 1_800_000_000.25, -3, 5)


def test_tags_ride_in_a_third_frame_only_when_set_and_bad_ones_are_protocol_errors() -> None:
    tagged = p.Put(3, 1, b"chunk", 0.0, 0, 9, 1_800_000_000.0, b"pkg.mod:fn", 100.0, b"user-42", 30.0)
    frames = p.encode(tagged)
    assert len(frames) == 3
    assert p.decode(frames) == tagged
    for bad in (frames[2][:-1], frames[2] + b"x", p.pack_tags(math.inf, b"", 0.0, b"", 0.0), p.pack_tags(0.0, b"k" * 1025, 1.0, b"", 0.0)):
        with pytest.raises(ProtocolError, match="tags"):
            p.decode([frames[0], frames[1], bad])


def test_a_put_whose_release_time_is_not_a_time_is_a_protocol_error() -> None:
    head = struct.pack(">4sBQIQdi", p.VERSION, p.Command.PUT, 1, 1, 1, math.nan, 0)
    with pytest.raises(ProtocolError, match="not a time"):
        p.decode([head, b"chunk"])


def test_expires_takes_seconds_a_timedelta_or_an_aware_datetime_and_refuses_the_rest() -> None:
    import datetime as dt

    from zdq.codec.timing import expiry_of

    now = time.time()
    assert now + 29 < timing_of(None, None, None, 30).expires < now + 31
    assert now + 59 < expiry_of(dt.timedelta(minutes=1)) < now + 61
    assert expiry_of(dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)) > 0  # past: expired, never "never"
    with pytest.raises(ValueError, match="timezone-aware"):
        expiry_of(dt.datetime(2030, 1, 1))
    with pytest.raises(TypeError, match="expires must be"):
        expiry_of("soon")
    with pytest.raises(ValueError, match="non-negative"):
        expiry_of(-1)
    with pytest.raises(ValueError, match="could never run"):
        timing_of(60, None, None, 30)


def test_an_eta_before_1970_is_at_once_and_absurd_times_are_refused_at_the_call() -> None:
    import datetime as dt

    import numpy as np

    utc = dt.timezone.utc
    # A past time runs at once, however far past (the wire takes no negative time: such a PUT
    # was refused by the broker and its future never settled).
    assert timing_of(None, dt.datetime(1960, 1, 1, tzinfo=utc), None) is None
    assert timing_of(None, dt.datetime.min.replace(tzinfo=utc), 2) == Timing(0.0, 2)
    assert timing_of(None, None, np.int64(3)) == Timing(0.0, 3)  # numpy's integers are integers
    assert timing_of(np.float64(1.5), None, None).not_before > 0
    for delay, eta in ((1e300, None), (dt.timedelta.max, None), (None, dt.datetime.max.replace(tzinfo=utc))):
        with pytest.raises(ValueError, match="delay is past the year 9999" if eta is None else "eta is past"):
            timing_of(delay, eta, None)


# -- the arithmetic of a release time ----------------------------------------------------------
def test_a_timedelta_delay_and_its_seconds_give_the_same_release_time() -> None:
    before = time.time()
    by_delta = timing_of(datetime.timedelta(minutes=2), None, None)
    by_seconds = timing_of(120, None, None)
    after = time.time()
    assert by_delta is not None and by_seconds is not None
    for timing in (by_delta, by_seconds):
        assert before + 120 <= timing.not_before <= after + 120 and timing.priority == 0


def test_a_zero_delay_is_released_at_the_time_of_the_call() -> None:
    before = time.time()
    timing = timing_of(0, None, None)
    assert timing is not None and before <= timing.not_before <= time.time()


def test_an_eta_in_any_timezone_is_the_same_instant() -> None:
    utc = datetime.datetime(2031, 5, 1, 12, 0, tzinfo=UTC)
    paris = utc.astimezone(datetime.timezone(datetime.timedelta(hours=2)))
    assert timing_of(None, paris, None) == timing_of(None, utc, None) == Timing(utc.timestamp(), 0)


def test_a_priority_alone_is_served_at_once_in_its_order() -> None:
    assert timing_of(None, None, -7) == Timing(0.0, -7)
    assert Timing() == Timing(0.0, 0)


def test_priorities_at_the_32_bit_bounds_are_taken_and_one_past_them_refused() -> None:
    from zdq.codec.timing import MAX_PRIORITY, MIN_PRIORITY

    assert timing_of(None, None, MAX_PRIORITY) == Timing(0.0, MAX_PRIORITY)
    assert timing_of(None, None, MIN_PRIORITY) == Timing(0.0, MIN_PRIORITY)
    with pytest.raises(ValueError, match="32 bits"):
        timing_of(None, None, MIN_PRIORITY - 1)


def test_a_release_time_fits_the_wire_whatever_was_asked() -> None:
    latest = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    timed = timing_of(None, latest, 1)
    assert timed is not None
    put = p.Put(1, 1, b"chunk", timed.not_before, timed.priority)
    assert p.decode(p.encode(put)) == put


def test_a_timing_is_frozen() -> None:
    timing = Timing(1.0, 2)
    with pytest.raises(AttributeError):
        timing.priority = 3  # type: ignore[misc]

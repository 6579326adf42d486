"""The pure schedule arithmetic (zdq.codec.schedules): ticks on a grid or a cron, missed ticks,
stored records. No clock is read: every time is handed in. (The rules first written with the
schedules' cluster tests are in tests/test_schedules.py.)"""

from __future__ import annotations

import json
import math
import struct
from datetime import datetime, timedelta, timezone

import pytest

from zdq.codec.schedules import GRACE, SCHEDULED, Missed, ScheduleRecord, Spec, _missed, plan

UTC = timezone.utc


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp()


# -- every -----------------------------------------------------------------------------------------
def test_a_grid_reaches_back_before_its_anchor() -> None:
    spec = Spec(every=10.0, anchor=100.0)
    assert [spec.next_after(t) for t in (75.0, 80.0, 99.0)] == [80.0, 90.0, 100.0]


def test_a_fractional_period_ticks_on_its_own_grid() -> None:
    spec = Spec(every=0.25, anchor=0.0)
    assert [spec.next_after(t) for t in (0.0, 0.1, 0.25, 1.0)] == [0.25, 0.25, 0.5, 1.25]


def test_the_next_tick_is_always_strictly_later_and_within_one_period() -> None:
    spec = Spec(every=7.5, anchor=3.0)
    for i in range(200):
        t = -100.0 + i * 1.37
        tick = spec.next_after(t)
        assert t < tick <= t + 7.5
        assert math.isclose((tick - 3.0) / 7.5, round((tick - 3.0) / 7.5))


@pytest.mark.parametrize("every", [True, math.inf, math.nan, -1, timedelta(0), [5]])
def test_an_every_that_is_not_a_positive_finite_period_is_refused(every: object) -> None:
    with pytest.raises(ValueError, match="must be a positive timedelta or number of seconds"):
        Spec.parse(every=every, anchor=0.0)


def test_an_every_given_as_a_timedelta_is_its_seconds() -> None:
    assert Spec.parse(every=timedelta(milliseconds=1500), anchor=9.0) == Spec(every=1.5, anchor=9.0)


@pytest.mark.parametrize("every", [1e-6, 0.005, timedelta(microseconds=10)])
def test_an_every_too_short_to_store_its_ticks_is_refused_naming_the_bound(every: object) -> None:
    with pytest.raises(ValueError, match=r"under 0.01 s: a schedule ticks at most 100 times a second"):
        Spec.parse(every=every, anchor=0.0)


def test_an_every_whose_first_tick_no_date_holds_is_refused_at_the_call() -> None:
    # 1e12 s: year 33,715; it was stored, then listing the schedules raised.
    with pytest.raises(ValueError, match=r"every=1000000000000.0 has no next tick a date can hold"):
        Spec.parse(every=1e12, anchor=at(2030, 1, 1))
    assert Spec.parse(every=0.01, anchor=0.0).every == 0.01
    with pytest.raises(ValueError, match=r"every=1000000000000000000000000000000000000000 is longer than any date"):
        Spec.parse(every=10**400, anchor=0.0)  # no float holds it


# -- cron ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cron", ["0 0 1 1 * 0 2031", "* * * * * * *"])
def test_a_cron_with_a_year_field_is_refused_naming_its_fields(cron: str) -> None:
    # croniter reads a seventh field as a year: the schedule would end, with no next tick to plan.
    with pytest.raises(ValueError, match=r"has 7 fields: a schedule takes 5, or 6 with seconds last"):
        Spec.parse(cron=cron, anchor=at(2030, 1, 1))


def test_a_cron_that_never_comes_is_refused_naming_the_argument() -> None:
    with pytest.raises(ValueError, match=r"cron='0 0 30 2 \*' has no next tick a date can hold"):
        Spec.parse(cron="0 0 30 2 *", anchor=at(2030, 1, 1))


def test_a_cron_is_read_in_utc() -> None:
    spec = Spec.parse(cron="0 0 * * *", anchor=0.0)
    assert spec.next_after(at(2030, 3, 10, 23, 59)) == at(2030, 3, 11)
    assert spec.next_after(at(2030, 3, 11)) == at(2030, 3, 12)  # strictly after a tick


def test_a_cron_crosses_months_and_years() -> None:
    yearly = Spec.parse(cron="0 0 1 1 *", anchor=0.0)
    assert yearly.next_after(at(2030, 6, 15)) == at(2031, 1, 1)
    monthly = Spec.parse(cron="30 12 31 * *", anchor=0.0)
    assert monthly.next_after(at(2030, 4, 1)) == at(2030, 5, 31, 12, 30)  # April has no 31st


def test_a_cron_on_weekdays_skips_the_weekend() -> None:
    spec = Spec.parse(cron="0 9 * * 1-5", anchor=0.0)
    friday_evening = at(2030, 3, 8, 18)  # 8 March 2030 is a Friday
    assert datetime.fromtimestamp(friday_evening, UTC).weekday() == 4
    assert spec.next_after(friday_evening) == at(2030, 3, 11, 9)  # Monday


# -- missed ticks ----------------------------------------------------------------------------------
def test_a_tick_reached_exactly_at_its_time_runs_and_the_next_is_on_the_grid() -> None:
    assert plan(Spec(every=60.0), 120.0, 120.0, Missed.SKIP) == (True, 180.0)


def test_the_grace_is_inclusive_for_both_policies() -> None:
    spec = Spec(every=60.0)
    for missed in Missed:
        assert plan(spec, 120.0, 120.0 + GRACE, missed) == (True, 180.0)
    assert plan(spec, 120.0, 120.0 + GRACE * 1.01, Missed.SKIP) == (False, 180.0)
    assert plan(spec, 120.0, 120.0 + GRACE * 1.01, Missed.ONCE) == (True, 180.0)


def test_a_late_wake_up_catches_up_to_the_first_tick_after_the_present() -> None:
    spec = Spec(every=60.0)
    for now in (300.0, 330.0, 359.9):
        assert plan(spec, 120.0, now, Missed.ONCE) == (True, 360.0)


def test_a_cron_schedule_missed_for_days_runs_once_then_keeps_to_its_times() -> None:
    spec = Spec.parse(cron="0 * * * *", anchor=0.0)
    due = at(2030, 1, 1, 10)
    now = at(2030, 1, 4, 15, 20)
    assert plan(spec, due, now, Missed.ONCE) == (True, at(2030, 1, 4, 16))
    assert plan(spec, due, now, Missed.SKIP) == (False, at(2030, 1, 4, 16))


def test_before_its_time_a_tick_waits_and_its_time_is_kept() -> None:
    for missed in Missed:
        assert plan(Spec.parse(cron="*/5 * * * *", anchor=0.0), 600.0, 10.0, missed) == (False, 600.0)


@pytest.mark.parametrize(("given", "expected"), [("once", Missed.ONCE), ("skip", Missed.SKIP), (Missed.SKIP, Missed.SKIP)])
def test_the_missed_policy_is_read_from_its_name_or_itself(given: Missed | str, expected: Missed) -> None:
    assert _missed(given) is expected


@pytest.mark.parametrize("given", ["ONCE", "always", "", 1])
def test_an_unknown_missed_policy_is_refused_naming_the_choices(given: object) -> None:
    with pytest.raises(ValueError, match="missed must be 'once' or 'skip'"):
        _missed(given)  # type: ignore[arg-type]


# -- stored records --------------------------------------------------------------------------------
RECORD = ScheduleRecord(3, "every minute", Spec(every=60.0, anchor=5.0), Missed.ONCE, 65.0, b"chunk")


def test_a_record_of_an_every_schedule_round_trips_with_empty_results() -> None:
    assert ScheduleRecord.unpack(RECORD.pack()) == RECORD
    assert ScheduleRecord.unpack(RECORD.pack()).last_results == b""


def test_a_record_written_before_priorities_reads_with_priority_zero() -> None:
    raw = RECORD.pack()
    n_head, n_payload = struct.unpack_from(">II", raw)
    head = json.loads(raw[8 : 8 + n_head])
    del head["priority"]
    old_head = json.dumps(head).encode()
    old = struct.pack(">II", len(old_head), n_payload) + old_head + raw[8 + n_head :]
    assert ScheduleRecord.unpack(old) == RECORD and ScheduleRecord.unpack(old).priority == 0


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\0\0\0\5\0\0\0\0{bad}",
        struct.pack(">II", 2, 0) + b"{}",
        struct.pack(">II", 4, 0) + b"[1,2]",
    ],
    ids=["empty", "bad json", "no fields", "not an object"],
)
def test_bytes_that_are_not_a_record_are_refused(raw: bytes) -> None:
    with pytest.raises(ValueError, match="not a stored schedule"):
        ScheduleRecord.unpack(raw)


def test_a_tick_a_skip_and_results_change_only_their_own_fields() -> None:
    ticked = RECORD.after_tick(66.0, 125.0, chunk=42)
    assert (ticked.due, ticked.ticks, ticked.last_tick, ticked.chunk, ticked.skipped) == (125.0, 1, 66.0, 42, 0)
    skipped = ticked.after_skip(185.0)
    assert (skipped.due, skipped.ticks, skipped.skipped, skipped.chunk) == (185.0, 1, 1, 42)
    done = skipped.after_done(70.0, b"results")
    assert (done.last_done, done.last_results, done.due, done.ticks) == (70.0, b"results", 185.0, 1)
    assert RECORD.ticks == 0 and RECORD.due == 65.0  # records are values: the old one is untouched
    assert ScheduleRecord.unpack(done.pack()) == done


def test_a_schedules_chunks_carry_an_owner_as_wide_as_a_drivers_identity() -> None:
    assert len(SCHEDULED) == 16

"""Named schedules, the pure and storage parts (issue 25, point 1): names checked, records that keep
their name (and records written before names existed), one schedule per name in a queue's table,
replaced atomically on LMDB, the home queue of a name, and the CLI's listing."""

from __future__ import annotations

import contextlib
from datetime import datetime, timezone
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from zdq.broker.schedules import ScheduleTable
from zdq.client.schedules import home_queue
from zdq.codec.schedules import (
    NAME_MAX,
    Missed,
    ScheduleRecord,
    Spec,
    check_schedule_name,
)
from zdq.errors import StorageError
from zdq.observe.commands import format_schedules
from zdq.observe.remote import schedule_row
from zdq.storage import LMDBStorage, Storage

from .test_storage import storage  # noqa: F401 - the fixture over both backends (a test's argument, F811 below)

HOUR = Spec(every=3600.0, anchor=0.0)


def record(schedule_id: int, name: str = "report", spec: Spec = HOUR, payload: bytes = b"task", **kw: object) -> ScheduleRecord:
    return ScheduleRecord(schedule_id, "make_report", spec, Missed.ONCE, 3600.0, payload, schedule_name=name, **kw)  # type: ignore[arg-type]


# -- names ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["report", "hourly report", "r" * NAME_MAX, "é-1", "42x"])
def test_a_printable_name_is_accepted_as_it_is(name: str) -> None:
    assert check_schedule_name(name) == name


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        (42, TypeError, "must be a str, got int 42"),
        (b"report", TypeError, "must be a str, got bytes"),
        ("", ValueError, "must not be empty"),
        ("r" * (NAME_MAX + 1), ValueError, f"at most {NAME_MAX} characters, got {NAME_MAX + 1}"),
        ("two\nlines", ValueError, "must be printable"),
        (" report", ValueError, "without surrounding spaces"),
        ("123", ValueError, "must not be digits alone"),
        ("²", ValueError, "must not be digits alone"),
        ("--yes", ValueError, "must not start with '-'"),
    ],
)
def test_a_bad_name_is_refused_saying_what_is_wrong(name: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        check_schedule_name(name)


def test_a_name_has_the_same_home_queue_in_every_process() -> None:
    # A CRC-32, not hash(): these values hold in any process, whatever PYTHONHASHSEED.
    assert [home_queue("report", n) for n in (1, 2, 3, 7)] == [0, 0, 2, 2]
    assert {home_queue(f"job {i}", 4) for i in range(40)} == {0, 1, 2, 3}  # names spread over the queues


# -- records -----------------------------------------------------------------------------------------
def test_a_named_record_round_trips_and_an_unnamed_one_is_written_as_before_names() -> None:
    named = record(5, priority=2)
    assert ScheduleRecord.unpack(named.pack()) == named
    unnamed = record(6, name="")
    head = json.loads(unnamed.pack()[8 : 8 + struct.unpack_from(">I", unnamed.pack())[0]])
    assert "schedule_name" not in head and ScheduleRecord.unpack(unnamed.pack()) == unnamed


def test_a_record_written_before_names_existed_reads_as_unnamed() -> None:
    head = json.dumps(
        {"id": 9, "name": "make_report", "cron": None, "every": 60.0, "anchor": 0.0, "missed": "skip", "due": 60.0,
         "ticks": 4, "skipped": 1, "last_tick": 1.0, "last_done": 2.0, "chunk": 3, "priority": 1}
    ).encode()
    old = ScheduleRecord.unpack(struct.pack(">II", len(head), 4) + head + b"taskresults")
    assert (old.schedule_id, old.schedule_name, old.ticks, old.payload, old.last_results) == (9, "", 4, b"task", b"results")


def test_the_same_timing_keeps_the_schedule_and_takes_the_new_task() -> None:
    old = record(1, payload=b"old task", ticks=7, skipped=1, last_tick=5.0, last_done=6.0, last_results=b"r", chunk=11)
    new = ScheduleRecord(2, "make_report_v2", Spec(every=3600.0, anchor=99.0), Missed.ONCE, 3699.0, b"new task",
                         priority=5, schedule_name="report")
    kept = new.replacing(old)
    assert (kept.schedule_id, kept.spec, kept.due, kept.ticks, kept.skipped, kept.last_results, kept.chunk) == (
        1, HOUR, 3600.0, 7, 1, b"r", 11
    )
    assert (kept.name, kept.payload, kept.priority) == ("make_report_v2", b"new task", 5)


@pytest.mark.parametrize(
    ("spec", "missed"),
    [(Spec(every=60.0), Missed.ONCE), (Spec(cron="0 * * * *"), Missed.ONCE), (HOUR, Missed.SKIP)],
    ids=["another every", "a cron", "another missed"],
)
def test_another_timing_starts_afresh_but_waits_for_the_old_tick_still_queued(spec: Spec, missed: Missed) -> None:
    old = record(1, ticks=7, chunk=11)
    new = ScheduleRecord(2, "make_report", spec, missed, 60.0, b"new", schedule_name="report")
    fresh = new.replacing(old)
    assert (fresh.schedule_id, fresh.spec, fresh.missed, fresh.due, fresh.ticks, fresh.chunk) == (2, spec, missed, 60.0, 0, 11)


# -- the broker's table -----------------------------------------------------------------------------
@contextlib.contextmanager
def _opened(path: Path) -> Iterator[LMDBStorage]:
    s = LMDBStorage(str(path), map_size=1 << 20)
    s.open()
    try:
        yield s
    finally:
        s.close()


def _ids(table: ScheduleTable) -> list[int]:
    return sorted(ScheduleRecord.unpack(raw).schedule_id for raw in table.records())


def test_a_name_added_three_times_is_one_schedule_and_unnamed_ones_add_up(storage: Storage) -> None:  # noqa: F811
    table = ScheduleTable("q", storage)
    first = ScheduleRecord.unpack(table.add(record(1).pack()))
    for i in (2, 3):
        kept = ScheduleRecord.unpack(table.add(record(i, payload=b"v%d" % i).pack()))
        assert (kept.schedule_id, kept.payload) == (1, b"v%d" % i)
    assert first.schedule_id == 1 and _ids(table) == [1]
    table.add(record(10, name="").pack())
    table.add(record(11, name="").pack())
    assert _ids(table) == [1, 10, 11]


def test_a_name_with_a_new_timing_replaces_the_old_id_and_a_name_cancels_it(storage: Storage) -> None:  # noqa: F811
    table = ScheduleTable("q", storage)
    table.add(record(1).pack())
    kept = ScheduleRecord.unpack(table.add(record(2, spec=Spec(every=60.0)).pack()))
    assert kept.schedule_id == 2 and _ids(table) == [2]
    assert table.cancel(1) is False  # the old id is gone with its timing
    assert table.cancel("other") is False
    assert table.cancel("report") is True and _ids(table) == [] and table.cancel("report") is False
    table.add(record(3).pack())  # the name is free again: a schedule of its own
    assert _ids(table) == [3] and table.cancel(3) is True


def test_a_durable_queue_opened_again_knows_its_names(tmp_path: Path) -> None:
    with _opened(tmp_path / "q") as s:
        table = ScheduleTable("q", s)
        table.add(record(1).pack())
        table.add(record(2, spec=Spec(every=60.0)).pack())  # replaced by another id: one transaction
        table.add(record(3, name="").pack())
    with _opened(tmp_path / "q") as again:
        table = ScheduleTable("q", again)
        assert _ids(table) == [2, 3]
        assert ScheduleRecord.unpack(table.add(record(4, spec=Spec(every=60.0)).pack())).schedule_id == 2
        assert _ids(table) == [2, 3]


def test_a_replacement_that_cannot_be_written_leaves_the_old_schedule_on_disk_and_in_the_table(tmp_path: Path) -> None:
    with _opened(tmp_path / "q") as s:
        table = ScheduleTable("q", s)
        table.add(record(1).pack())
        too_big = record(2, spec=Spec(every=60.0), payload=b"x" * (2 << 20))  # more than the 1 MiB map
        with pytest.raises(StorageError, match=r"schedules \[1, 2\] were not written"):
            table.add(too_big.pack())
        assert _ids(table) == [1]
        s.commit(force=True)  # nothing of the failed replacement is held for a later commit
    with _opened(tmp_path / "q") as again:
        assert [ScheduleRecord.unpack(r).schedule_id for r in again.stored_schedules()] == [1]


# -- the CLI's listing ----------------------------------------------------------------------------
def test_zdq_schedules_list_shows_names_ids_timing_and_queue_by_next_tick() -> None:
    found = {
        "p-queue-0": [schedule_row(record(7, ticks=3).pack())],
        "p-queue-1": [schedule_row(ScheduleRecord(8, "cleanup", Spec(cron="*/5 * * * *"), Missed.SKIP, 300.0, b"").pack())],
        "p-queue-2": {"error": "queue p-queue-2 no longer runs on this worker"},
    }
    lines = format_schedules(found).splitlines()
    assert lines[0] == "p-queue-2: queue p-queue-2 no longer runs on this worker"
    assert lines[1].split()[:3] == ["name", "id", "task"]
    assert lines[2].split() == ["-", "8", "cleanup", "cron", "*/5", "*", "*", "*", "*", "1970-01-01", "00:05:00", "0", "0", "p-queue-1"]
    assert lines[3].split() == ["report", "7", "make_report", "every", "3600s", "1970-01-01", "01:00:00", "3", "0", "p-queue-0"]
    assert format_schedules({"p-queue-0": []}) == "no schedules"
    assert json.loads(json.dumps(found))["p-queue-0"][0]["schedule_name"] == "report"


def test_the_cli_reads_ascii_digits_as_an_id_and_anything_else_as_a_name_checked() -> None:
    from zdq.observe.commands import _schedule_key

    assert _schedule_key("42") == 42 and _schedule_key("report") == "report"
    with pytest.raises(ValueError, match="digits alone"):
        _schedule_key("²")  # a digit to str.isdigit, not to int()


def test_a_stored_schedule_with_no_next_tick_ends_and_the_others_tick_on(storage: Storage) -> None:  # noqa: F811
    """A record the call would refuse now (a seven-field cron, written before that check) killed
    the broker's loop when its last tick passed, and a durable queue holding it never opened again."""
    ending = Spec(cron="0 0 1 1 * 0 2031", anchor=0.0)  # once, on 2031-01-01, then never
    table = ScheduleTable("q", storage)
    table.add(record(1, name="once", spec=ending).pack())
    table.add(record(2, name="hourly").pack())
    after = datetime(2031, 6, 1, tzinfo=timezone.utc).timestamp()
    assert table.fire(after) == 1  # the hourly one's tick; the ended one raised nothing
    assert [ScheduleRecord.unpack(r).schedule_name for r in table.records()] == ["hourly"]
    if isinstance(storage, LMDBStorage):  # a durable queue opened again finds the one left
        assert [ScheduleRecord.unpack(r).schedule_id for r in storage.stored_schedules()] == [2]

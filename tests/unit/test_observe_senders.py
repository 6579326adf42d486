"""Whose reports the monitor believes: a queue's entry only from the worker its pool's registry
record names, a consumer's only for a recorded pool and at most so many per worker, a ``gone`` only
from the entry's worker (the cluster side, with a forged report from a task, is in
tests/test_observe_forged.py)."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from distributed.protocol.serialize import Serialized, serialize

from zdq.client.registry import PoolRecord, registry_key
from zdq.config import settings
from zdq.observe import monitor as monitor_module
from zdq.observe.monitor import MAX_CONSUMERS_PER_SENDER, Monitor
from zdq.observe.placements import FixedPlacements, RegistryPlacements

_PLACED = FixedPlacements({"jobs": {"jobs-queue-0": {"tcp://a"}, "jobs-queue-1": {"tcp://b"}}})


def _queue(name: str, pool: str = "jobs", **counts: int) -> dict[str, Any]:
    return {"name": name, "pool": pool, "endpoint": "tcp://e:1", "tasks_stored": counts.get("tasks_stored", 0)}


def _consumer(name: str, pool: str = "jobs", cid: str = "") -> dict[str, Any]:
    return {"name": name, "pool": pool, "id": cid or name, "running": True, "tasks_done": 1}


def _shown(monitor: Monitor) -> dict[str, tuple[list[str], list[str]]]:
    return {
        name: ([q["name"] for q in pool["queues"]], [c["id"] for c in pool["consumers"]])
        for name, pool in monitor.status()["pools"].items()
    }


def test_a_queue_is_shown_only_from_the_worker_its_pools_record_names() -> None:
    monitor = Monitor(None, _PLACED)
    forged = [_queue(f"jobs-queue-{i}") for i in range(2, 3000)] + [_queue("evil-queue-0", pool="evil")]
    monitor.on_report(worker="tcp://a", queues=[_queue("jobs-queue-0", tasks_stored=3), _queue("jobs-queue-1"), *forged])
    monitor.on_report(worker="tcp://b", queues=[_queue("jobs-queue-0", tasks_stored=10**6)])  # not its queue
    assert _shown(monitor) == {"jobs": (["jobs-queue-0"], [])}
    queue = monitor.status()["pools"]["jobs"]["queues"][0]
    assert (queue["worker"], queue["tasks_stored"]) == ("tcp://a", 3)
    assert monitor.status()["unverified"] == 1 + len(forged) + 1


def test_a_queue_gone_is_taken_only_from_the_worker_that_reports_it() -> None:
    monitor = Monitor(None, _PLACED)
    monitor.on_report(worker="tcp://a", queues=[_queue("jobs-queue-0")])
    monitor.on_report(worker="tcp://b", gone=[("queue", "jobs", "jobs-queue-0")])
    assert _shown(monitor) == {"jobs": (["jobs-queue-0"], [])}
    monitor.on_report(worker="tcp://a", gone=[("queue", "jobs", "jobs-queue-0")])
    assert _shown(monitor) == {}  # its only queue gone: the pool is no longer shown


def test_consumers_are_shown_for_recorded_pools_only_bounded_per_worker_and_kept_by_their_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    monitor = Monitor(None, _PLACED)
    many = [_consumer(f"C-{i}", cid=f"a{i}") for i in range(MAX_CONSUMERS_PER_SENDER + 100)]
    with caplog.at_level(logging.WARNING, logger="zdq.observe.monitor"):
        monitor.on_report(worker="tcp://a", consumers=[*many, _consumer("C-0", pool="evil", cid="e0")])
        monitor.on_report(worker="tcp://a", consumers=many)  # again: the bound holds, one warning a minute
    shown = _shown(monitor)
    assert set(shown) == {"jobs"} and len(shown["jobs"][1]) == MAX_CONSUMERS_PER_SENDER
    assert len([r for r in caplog.records if "consumers at most" in r.getMessage()]) == 1
    # Another worker may neither update nor retire a's consumer; its own are bounded apart.
    monitor.on_report(worker="tcp://b", consumers=[dict(_consumer("C-0", cid="a0"), tasks_done=10**6), _consumer("D", cid="b0")],
                      gone=[("consumer", "jobs", "C-1", "a1")])
    by_id = {c["id"]: c for c in monitor.status()["pools"]["jobs"]["consumers"]}
    assert by_id["a0"]["tasks_done"] == 1 and "a1" in by_id and by_id["b0"]["worker"] == "tcp://b"


def test_unverified_entries_are_logged_only_once_they_outlast_the_placement_race(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [time.monotonic()]
    monkeypatch.setattr(monitor_module.time, "monotonic", lambda: now[0])
    monitor = Monitor(None, _PLACED)
    with caplog.at_level(logging.WARNING, logger="zdq.observe.monitor"):
        for _ in range(3):  # a broker reporting before its pool's record is published
            monitor.on_report(worker="tcp://c", queues=[_queue("new-queue-0", pool="new")])
            now[0] += 1.0
        assert not [r for r in caplog.records if "registry record" in r.getMessage()]
        for _ in range(12):  # still not named after the grace: forged, or a record never published
            monitor.on_report(worker="tcp://c", queues=[_queue("new-queue-0", pool="new")])
            now[0] += 1.0
    logged = [r.getMessage() for r in caplog.records if "registry record" in r.getMessage()]
    assert len(logged) == 1 and "new-queue-0" in logged[0] and "tcp://c" in logged[0]


class _Scheduler:
    """The part of a Dask scheduler that the registry placements read: its published datasets, as
    Dask keeps them (the client's serialized bytes)."""

    def __init__(self) -> None:
        self.datasets: dict[str, dict[str, Any]] = {}
        self.extensions = {"publish": self}

    def publish(self, record: Any, key: str) -> None:
        header, frames = serialize(record, serializers=("pickle",))
        self.datasets[key] = {"data": Serialized(header, frames), "keys": ()}


def _record(name: str, workers: tuple[str, ...], dirpath: str | None = None) -> PoolRecord:
    queues = tuple(f"{name}-queue-{i}" for i in range(len(workers)))
    return PoolRecord(name, dirpath is not None, dirpath, queues, ("",) * len(workers), None, None, settings(),
                      "client", b"token", workers)


def test_registry_placements_read_the_records_published_on_the_scheduler_and_follow_their_changes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scheduler = _Scheduler()
    placements = RegistryPlacements(scheduler)
    scheduler.publish(_record("jobs", ("tcp://a", "tcp://b")), registry_key("jobs", None))
    scheduler.publish(_record("jobs", ("tcp://c",), "/d"), registry_key("jobs", "/d"))  # one name, two pools
    scheduler.publish({"not": "a pool"}, "other")  # another program's dataset: not read
    with caplog.at_level(logging.WARNING, logger="zdq.observe.placements"):
        scheduler.publish("junk", registry_key("junk", None))
        placements.refresh()
    assert placements.holds("jobs", "jobs-queue-0", "tcp://a") and placements.holds("jobs", "jobs-queue-0", "tcp://c")
    assert not placements.holds("jobs", "jobs-queue-0", "tcp://b") and placements.holds("jobs", "jobs-queue-1", "tcp://b")
    assert not placements.has_pool("junk") and ["junk" in r.getMessage() for r in caplog.records] == [True]
    scheduler.publish(_record("jobs", ("tcp://a", "tcp://d")), registry_key("jobs", None))  # queue 1 placed again
    del scheduler.datasets[registry_key("jobs", "/d")]  # that pool closed
    placements.refresh()
    assert placements.holds("jobs", "jobs-queue-1", "tcp://d") and not placements.holds("jobs", "jobs-queue-1", "tcp://b")
    assert not placements.holds("jobs", "jobs-queue-0", "tcp://c")


def test_the_last_counts_sent_with_an_entrys_going_are_taken_though_its_pools_record_is_withdrawn() -> None:
    # Reviewer 24: a consumer closed as it finished its last tasks left them out of the totals (the
    # feed told it gone without its last counts; now they come together).
    monitor = Monitor(None, FixedPlacements({"jobs": {"jobs-queue-0": {"tcp://a"}}}))
    queue = _queue("jobs-queue-0", tasks_stored=200)
    monitor.on_report(worker="tcp://a", queues=[queue], consumers=[{**_consumer("C-0", cid="c0"), "tasks_done": 50}])
    monitor.on_report(worker="tcp://a", queues=[queue], consumers=[{**_consumer("C-0", cid="c0"), "tasks_done": 200}],
                      gone=[("consumer", "jobs", "C-0", "c0")])
    pool = monitor.status()["pools"]["jobs"]
    assert pool["totals"]["completed"] == 200 and pool["consumers"] == []
    # Its pool closed: its record is withdrawn as its last reports come. They are no forgery.
    monitor._placements = FixedPlacements({})
    monitor.on_report(worker="tcp://a", queues=[queue], gone=[("queue", "jobs", "jobs-queue-0", "")])
    # Another worker's "last counts" of entries it never reported are dropped (and not counted).
    monitor.on_report(worker="tcp://b", consumers=[{**_consumer("C-9", cid="c9"), "tasks_done": 10**6}],
                      gone=[("consumer", "jobs", "C-9", "c9")])
    assert monitor.status()["unverified"] == 0 and monitor.status()["pools"] == {}


def test_a_pool_whose_workers_all_fall_silent_keeps_its_totals_hidden_and_shows_them_again_when_they_report(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Reviewer 24: with its only worker stopped, the pool's view was dropped, and after SIGCONT its
    # totals started again from what the live entries reported (completed 50 where it was 100).
    now = [1000.0]
    monkeypatch.setattr(monitor_module.time, "monotonic", lambda: now[0])
    monitor = Monitor(None, _PLACED)
    monitor.on_report(worker="tcp://a", interval=1.0, queues=[_queue("jobs-queue-0")],
                      consumers=[{**_consumer("C-0", cid="first"), "tasks_done": 50}])
    monitor.on_report(worker="tcp://a", gone=[("consumer", "jobs", "C-0", "first")])  # its ConsumerPool closed
    monitor.on_report(worker="tcp://a", interval=1.0, queues=[_queue("jobs-queue-0")],
                      consumers=[{**_consumer("C-0", cid="second"), "tasks_done": 50}])
    assert monitor.status()["pools"]["jobs"]["totals"]["completed"] == 100
    now[0] += 14  # the worker is stopped: nothing reports
    assert monitor.status()["pools"] == {}  # not shown...
    now[0] += 1
    monitor.on_report(worker="tcp://a", interval=1.0, queues=[_queue("jobs-queue-0")],
                      consumers=[{**_consumer("C-0", cid="second"), "tasks_done": 60}])
    assert monitor.status()["pools"]["jobs"]["totals"]["completed"] == 110  # ...and back where it was
    # Its record withdrawn: closed (its queue told gone), or silent past the bound, its view goes.
    monitor._placements = FixedPlacements({})
    monitor.on_report(worker="tcp://a", gone=[("consumer", "jobs", "C-0", "second"), ("queue", "jobs", "jobs-queue-0", "")])
    now[0] += 1
    monitor.status()
    assert "jobs" not in monitor._pools
    monitor._placements = _PLACED
    monitor.on_report(worker="tcp://a", interval=1.0, queues=[_queue("jobs-queue-0")])
    monitor._placements = FixedPlacements({})
    now[0] += monitor_module._HIDDEN_KEEP + 60
    monitor.status()
    assert "jobs" not in monitor._pools

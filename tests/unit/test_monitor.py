"""The monitor's figures: sums, rates, expiry, bounded entries, malformed reports and metrics
(the broker's side of purge and round trips is in tests/test_monitor.py)."""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import pytest

from zdq.names import pool_of_queue
from zdq.observe import metrics
from zdq.observe import monitor as monitor_module
from zdq.observe.monitor import Monitor
from zdq.stats import ROUND_TRIP_BOUNDS


class _Anyone:
    """Placements that vouch for every entry: these tests are about the figures, not the senders
    (those are in the tests of forged reports below)."""

    def refresh(self) -> None:
        pass

    def holds(self, pool: str, queue: str, worker: str) -> bool:
        return True

    def has_pool(self, pool: str) -> bool:
        return True


_ANYONE = _Anyone()


def _queue(name: str, **counts: int) -> dict[str, object]:
    base = {"name": name, "pool": pool_of_queue(name), "durable": False, "host": "127.0.0.1", "endpoint": ""}
    fields = ("ready_tasks", "leased_tasks", "awaiting_tasks", "dead_tasks", "tasks_stored", "tasks_acked",
              "tasks_dead_lettered", "chunks_redelivered", "bad_messages", "consumers")
    return {**base, **{f: counts.get(f, 0) for f in fields}}


def _consumer(name: str, pool: str, done: int, failed: int = 0) -> dict[str, object]:
    return {"name": name, "pool": pool, "running": True, "tasks_done": done,
            "tasks_failed": failed, "tasks_retried": 0, "tasks_in_flight": 0}


def test_monitor_sums_a_pools_queues_and_consumers_and_forgets_what_its_workers_report_gone() -> None:
    monitor = Monitor(None, _ANYONE)
    monitor.on_report(
        worker="tcp://a", interval=1.0,
        queues=[_queue("jobs-queue-0", ready_tasks=5, tasks_stored=10), _queue("jobs-queue-1", tasks_stored=7)],
        consumers=[_consumer("C-0", "jobs", 12, failed=1)],
    )
    monitor.on_report(worker="tcp://b", queues=[], consumers=[_consumer("C-1", "jobs", 3)])
    pool = monitor.status()["pools"]["jobs"]
    assert [q["name"] for q in pool["queues"]] == ["jobs-queue-0", "jobs-queue-1"]
    assert pool["queues"][0]["worker"] == "tcp://a"
    t = pool["totals"]
    assert (t["submitted"], t["ready"], t["completed"], t["failed"], t["consumers"]) == (17, 5, 15, 1, 2)
    assert monitor.reports == 2 and monitor.entries == 4
    moved = _queue("jobs-queue-1", tasks_stored=0)
    moved["endpoint"] = "tcp://127.0.0.1:2"  # placed again after its worker was lost
    monitor.on_report(worker="tcp://c", queues=[moved])
    assert monitor.status()["pools"]["jobs"]["totals"]["recoveries"] == 1
    monitor.on_report(worker="tcp://b", gone=[("consumer", "jobs", "C-1")])
    assert [c["name"] for c in monitor.status()["pools"]["jobs"]["consumers"]] == ["C-0"]
    monitor._expire(time.monotonic() + 60)  # nothing reported for a minute: the pool is gone
    assert monitor.status()["pools"] == {}


def test_monitor_rates_are_per_second_over_a_window_of_samples_and_never_negative() -> None:
    monitor = Monitor(None, _ANYONE)
    now = time.monotonic()
    monitor.on_report(worker="tcp://a", queues=[_queue("jobs-queue-0")])
    view = monitor._pools["jobs"]
    view.history.clear()
    # Counters move once per chunk: 10, 110, 110, 210 a second apart is 50/s, not 100, 0, 100.
    # Then the totals fall below where the window starts (a pool's queues placed again count
    # from zero): a rate taken over that window would be negative, and is shown as none.
    view.history.extend([
        (now - 4, 10, 5, 1), (now - 3, 110, 55, 3), (now - 2, 110, 55, 3), (now - 1, 210, 55, 3), (now, 0, 0, 0),
    ])
    rates = monitor._pools and monitor.status()["pools"]["jobs"]["rates"]
    assert rates["submitted"][:3] == [100.0, 50.0, 66.7] and rates["completed"][:3] == [50.0, 25.0, 16.7]
    assert len(rates["submitted"]) == 4  # the sample whose totals went down is among those checked
    assert all(r >= 0 for key in ("submitted", "completed", "failed") for r in rates[key])


def test_the_metrics_collector_names_every_family_zdq_and_labels_by_pool_and_queue_only() -> None:
    pytest.importorskip("prometheus_client", reason="prometheus_client is not installed")
    monitor = Monitor(None, _ANYONE)
    queue = _queue("jobs-queue-0", ready_tasks=4, tasks_stored=9)
    queue["round_trips"] = [1] + [0] * (len(ROUND_TRIP_BOUNDS) - 1) + [2]
    queue["round_trip_sum"] = 120.5
    monitor.on_report(worker="tcp://a", queues=[queue], consumers=[_consumer("C-0", "jobs", 8)])
    metrics._monitors.add(monitor)
    try:
        families = {f.name: f for f in metrics._Collector().collect()}
    finally:
        metrics._monitors.discard(monitor)
    assert all(name.startswith("zdq_") for name in families)
    ready = [s for s in families["zdq_queue_ready"].samples if s.labels["pool"] == "jobs"]
    assert [(s.labels, s.value) for s in ready] == [({"pool": "jobs", "queue": "jobs-queue-0"}, 4.0)]
    completed = [s for s in families["zdq_tasks_completed"].samples if s.labels["pool"] == "jobs"]
    assert completed[0].value == 8.0
    rtt = {s.name: s.value for s in families["zdq_chunk_round_trip_seconds"].samples if s.labels.get("pool") == "jobs"
           and s.labels.get("le") in (None, "+Inf", "0.001")}
    assert rtt["zdq_chunk_round_trip_seconds_count"] == 3 and rtt["zdq_chunk_round_trip_seconds_sum"] == 120.5


class _Clock:
    """time.monotonic for the monitor, moved by hand."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        monkeypatch.setattr(monitor_module.time, "monotonic", lambda: self.now)


def _scrape(monitor: Monitor) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    pytest.importorskip("prometheus_client", reason="prometheus_client is not installed")
    metrics._monitors.add(monitor)
    try:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in metrics._Collector().collect()
            for s in family.samples
        }
    finally:
        metrics._monitors.discard(monitor)


@pytest.mark.parametrize(
    "bad",
    [
        {"queues": [dict(_queue("jobs-queue-9"), tasks_stored="lots")]},
        {"queues": [{k: v for k, v in _queue("jobs-queue-9").items() if k != "name"}]},
        {"interval": "x"},
        {"interval": math.nan},
        {"queues": [dict(_queue("jobs-queue-9"), tasks_stored=math.inf)]},
        {"queues": [dict(_queue("jobs-queue-9"), ready_tasks=-1)]},
        {"queues": [dict(_queue("jobs-queue-9"), round_trips=[1, 2])]},
        {"queues": [dict(_queue("jobs-queue-9"), name="x" * 100_000)]},
        {"queues": "jobs-queue-9"},
        {"queues": [None, 3, "q"]},
        {"consumers": [dict(_consumer("C-9", "jobs", 1), tasks_done="1")]},
        {"consumers": [dict(_consumer("C-9", "jobs", 1), pool=["jobs"])]},
        {"gone": [("queue",)], "queues": [{"name": 1}]},
    ],
)
def test_a_malformed_report_is_dropped_with_one_warning_and_harms_neither_the_monitor_nor_later_reports(
    bad: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    monitor = Monitor(None, _ANYONE)
    good = {"interval": 1.0, "queues": [_queue("jobs-queue-0", tasks_stored=4)], "consumers": [_consumer("C-0", "jobs", 2)]}
    with caplog.at_level(logging.WARNING, logger="zdq.observe.monitor"):
        for _ in range(3):  # the stream handler never raises: Dask would drop the worker that sent it
            monitor.on_report(worker="tcp://evil", **{**good, **bad})
            monitor.on_report(worker="tcp://good", **good)
    assert len([r for r in caplog.records if "tcp://evil" in r.getMessage()]) == 1  # once per sender
    assert not [r for r in caplog.records if "tcp://good" in r.getMessage()]
    status = monitor.status()
    json.dumps(status, allow_nan=False)  # what /zdq/status.json writes
    assert monitor.dropped >= 3
    pool = status["pools"]["jobs"]
    assert [q["name"] for q in pool["queues"]] == ["jobs-queue-0"] and pool["totals"]["submitted"] == 4
    assert all(isinstance(v, int) for v in pool["totals"].values())
    samples = _scrape(monitor)
    assert samples[("zdq_tasks_submitted_total", (("pool", "jobs"), ("queue", "jobs-queue-0")))] == 4


def test_a_reports_interval_is_clamped_so_that_a_forged_one_cannot_stop_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock(monkeypatch)
    monitor = Monitor(None, _ANYONE)
    monitor.on_report(worker="tcp://a", interval=1e12, queues=[_queue("jobs-queue-0")])
    assert monitor.status()["interval"] == 60.0
    # Each entry expires after its own sender's interval: the forged one does not hold the others.
    monitor.on_report(worker="tcp://b", interval=1.0, queues=[_queue("other-queue-0")])
    clock.now += 11
    assert list(monitor.status()["pools"]) == ["jobs"]
    clock.now += 290  # five intervals of the longest allowed (60 s)
    assert monitor.status()["pools"] == {}


def test_counters_never_go_backwards_when_a_queue_or_consumer_is_placed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock(monkeypatch)
    monitor = Monitor(None, _ANYONE)
    trips = [3] + [0] * len(ROUND_TRIP_BOUNDS)
    q0 = dict(_queue("jobs-queue-0", tasks_stored=100, tasks_acked=90), id="b1", round_trips=trips, round_trip_sum=1.5)
    monitor.on_report(worker="tcp://a", queues=[q0], consumers=[dict(_consumer("C-0", "jobs", 80, failed=5), id="c1")])
    before = _scrape(monitor)
    # The worker is killed: the queue is placed again (new id, counters from 0), the consumer replaced.
    clock.now += 2
    q1 = dict(_queue("jobs-queue-0", tasks_stored=7), id="b2", endpoint="tcp://new:1", round_trips=[1] + [0] * len(ROUND_TRIP_BOUNDS))
    monitor.on_report(worker="tcp://b", queues=[q1], consumers=[dict(_consumer("C-0", "jobs", 4), id="c2")])
    monitor.on_report(worker="tcp://a", gone=[("consumer", "jobs", "C-0", "c1")])  # only its own worker tells it gone
    # A source that restarted without saying so: its counter went down under the same id.
    clock.now += 1
    q2 = dict(q1, tasks_stored=2)
    monitor.on_report(worker="tcp://b", queues=[q2], consumers=[dict(_consumer("C-0", "jobs", 6), id="c2")])
    after = _scrape(monitor)
    assert {k: v for k, v in after.items() if k[0].endswith(("_total", "_bucket", "_count", "_sum")) and v < before.get(k, 0)} == {}
    labels = (("pool", "jobs"), ("queue", "jobs-queue-0"))
    assert after[("zdq_tasks_submitted_total", labels)] == 100 + 7 + 2
    assert after[("zdq_tasks_acked_total", labels)] == 90
    assert after[("zdq_chunk_round_trip_seconds_count", labels)] == 3 + 1 + 1
    assert after[("zdq_tasks_completed_total", (("pool", "jobs"),))] == 80 + 6
    assert after[("zdq_tasks_failed_total", (("pool", "jobs"),))] == 5
    t = monitor.status()["pools"]["jobs"]["totals"]
    assert (t["submitted"], t["completed"], t["failed"], t["consumers"], t["recoveries"]) == (109, 86, 5, 1, 1)
    # The queue's worker stops reporting: the pool goes, and its counters with it (no stale series).
    clock.now += 60
    assert monitor.status()["pools"] == {}


def test_a_consumer_silent_for_a_while_then_reporting_again_is_counted_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Reviewer 23: a worker SIGSTOPped for 25 s, then continued; its consumer's 175 tasks were
    # counted twice in `zdq status` (retired when it fell silent, counted again when it reported).
    clock = _Clock(monkeypatch)
    monitor = Monitor(None, _ANYONE)

    def report(worker: str, cid: str, done: int) -> None:
        monitor.on_report(worker=worker, interval=1.0, queues=[_queue("jobs-queue-0")] if worker == "tcp://q" else [],
                          consumers=[dict(_consumer(cid, "jobs", done), id=cid)] if cid else [])

    report("tcp://a", "stopped", 175)
    report("tcp://b", "busy", 500)
    report("tcp://q", "", 0)
    for _ in range(30):  # the first worker is stopped: 30 s without its reports
        clock.now += 1.0
        report("tcp://b", "busy", 500)
        report("tcp://q", "", 0)
    pool = monitor.status()["pools"]["jobs"]
    assert [c["id"] for c in pool["consumers"]] == ["busy"]  # not shown while silent...
    assert pool["totals"]["completed"] == 675  # ...but what it did still counts
    report("tcp://a", "stopped", 750)  # continued: its own counter went on from 175
    pool = monitor.status()["pools"]["jobs"]
    assert sorted(c["id"] for c in pool["consumers"]) == ["busy", "stopped"]
    assert pool["totals"]["completed"] == 1250 and pool["totals"]["consumers"] == 2
    assert _scrape(monitor)[("zdq_tasks_completed_total", (("pool", "jobs"),))] == 1250
    # Another worker cannot speak for the silent consumer, nor take it over.
    clock.now += 30
    report("tcp://b", "busy", 500)
    report("tcp://q", "", 0)
    report("tcp://evil", "stopped", 10_000)
    assert monitor.status()["pools"]["jobs"]["totals"]["completed"] == 1250
    monitor.on_report(worker="tcp://a", gone=[("consumer", "jobs", "stopped", "stopped")])  # told gone while silent
    report("tcp://b", "busy", 500)
    assert monitor.status()["pools"]["jobs"]["totals"]["completed"] == 1250


def test_two_consumer_pools_that_repeat_consumer_names_are_counted_apart() -> None:
    monitor = Monitor(None, _ANYONE)
    for round_ in (1, 2):  # reports alternate between the two pools' workers
        for worker, ids in (("tcp://a", ("a0", "a1")), ("tcp://b", ("b0", "b1"))):
            consumers = [dict(_consumer(f"GeneralConsumer-{i}", "jobs", 100 * round_), id=cid, worker=worker)
                         for i, cid in enumerate(ids)]
            monitor.on_report(worker=worker, consumers=consumers, queues=[_queue("jobs-queue-0")])
    pool = monitor.status()["pools"]["jobs"]
    assert sorted((c["name"], c["worker"]) for c in pool["consumers"]) == [
        ("GeneralConsumer-0", "tcp://a"), ("GeneralConsumer-0", "tcp://b"),
        ("GeneralConsumer-1", "tcp://a"), ("GeneralConsumer-1", "tcp://b"),
    ]
    assert pool["totals"]["completed"] == 800 and pool["totals"]["consumers"] == 4
    monitor.on_report(worker="tcp://a", gone=[("consumer", "jobs", "GeneralConsumer-0", "a0")])
    assert sorted(c["id"] for c in monitor.status()["pools"]["jobs"]["consumers"]) == ["a1", "b0", "b1"]


def test_a_consumers_rate_is_taken_over_several_reports_not_between_two(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock(monkeypatch)
    monitor = Monitor(None, _ANYONE)
    shown = []
    for tick in range(40):  # 84 tasks/s, in steps of 210 that land every 2.5 s; reports every second
        seconds = tick * 1.0
        done = 210 * int(seconds / 2.5) if seconds < 25 else 210 * 10  # then the consumer stops
        monitor.on_report(worker="tcp://a", consumers=[dict(_consumer("C-0", "jobs", done), id="c")],
                          queues=[_queue("jobs-queue-0")])
        shown.append(monitor.status()["pools"]["jobs"]["consumers"][0]["rate"])
        clock.now += 1.0
    assert all(75 <= r <= 95 for r in shown[8:25]), shown  # between consecutive reports: 0 or 210
    assert shown[-1] == 0 and all(a >= b for a, b in zip(shown[27:], shown[28:])), shown


def test_the_monitor_keeps_a_bounded_number_of_entries_dropping_the_oldest_and_logging_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = _Clock(monkeypatch)
    monkeypatch.setattr(monitor_module, "MAX_KEPT", 50)
    monitor = Monitor(None, _ANYONE)
    with caplog.at_level(logging.WARNING, logger="zdq.observe.monitor"):
        for i in range(200):
            clock.now += 0.01
            monitor.on_report(worker="tcp://evil", queues=[_queue(f"p{i}-queue-0", tasks_stored=1)])
    status = monitor.status()
    kept = sum(len(p["queues"]) + len(p["consumers"]) for p in status["pools"].values())
    assert kept == 50 and "p199" in status["pools"] and "p0" not in status["pools"]
    assert len([r for r in caplog.records if "oldest are dropped" in r.getMessage()]) == 1
    clock.now += 11  # the sender stopped reporting: its entries expire
    assert monitor.status()["pools"] == {}


def test_two_brokers_reporting_one_queue_name_in_turn_do_not_inflate_its_counters() -> None:
    monitor = Monitor(None, _ANYONE)  # two pools of the same name on one cluster: their queue names repeat
    for _ in range(5):
        monitor.on_report(worker="tcp://a", queues=[dict(_queue("jobs-queue-0", tasks_stored=10), id="x")])
        monitor.on_report(worker="tcp://b", queues=[dict(_queue("jobs-queue-0", tasks_stored=3), id="y")])
    assert monitor.status()["pools"]["jobs"]["totals"]["submitted"] == 13


def test_a_report_with_a_self_field_is_dropped_without_raising_out_of_the_handler() -> None:
    """Dask calls the handler with ``**message``: a ``self`` field must not make the call raise
    (Dask would then close the worker's stream and remove the worker)."""
    monitor = Monitor(None, _ANYONE)
    monitor.on_report(worker="tcp://a", self=1)
    monitor.on_report(worker="tcp://a", self=1, queues=[_queue("jobs-queue-0")])
    assert monitor.reports == 2  # both reached the body (a binding error would have raised above)


def test_a_consumer_entry_naming_another_worker_than_its_sender_is_refused() -> None:
    monitor = Monitor(None, _ANYONE)
    forged = {**_consumer("C-9", "jobs", 10**9), "worker": "tcp://10.9.9.9:1"}
    monitor.on_report(worker="tcp://a", interval=1.0, queues=[], consumers=[forged, _consumer("C-0", "jobs", 3)])
    consumers = monitor.status()["pools"]["jobs"]["consumers"]
    assert [c["name"] for c in consumers] == ["C-0"]

"""Rate limits without a cluster: the syntax (zdq.codec.rates), the token bucket, and the queue's
limits over a real in-memory storage (zdq.broker.rates): parked keys, skipping, debts, wake times."""

from __future__ import annotations

import math

import pytest

from zdq.broker.leases import LeaseTable
from zdq.broker.rates import Bucket, RateLimits
from zdq.codec.rates import chunk_cap, format_rate, rate_key_of, rate_of, share
from zdq.storage import ChunkMeta, LMDBStorage, MemoryStorage

D = b"d" * 16


@pytest.mark.parametrize(
    ("given", "rate"),
    [("100/s", 100.0), ("6000/m", 100.0), ("10/h", 10 / 3600), (" 5 / min ", 5 / 60), ("2.5", 2.5), (7, 7.0), (0.5, 0.5), (None, None), (0, None), ("0/s", None)],
)
def test_rate_syntax(given: object, rate: float | None) -> None:
    assert rate_of(given) == pytest.approx(rate) if rate else rate_of(given) is None


@pytest.mark.parametrize("bad", ["fast", "10/d", "-1/s", "inf", "nan/s", "/s", -3, math.inf])
def test_bad_rates_name_the_form(bad: object) -> None:
    with pytest.raises(ValueError, match="rate_limit"):
        rate_of(bad)


def test_bad_types_are_refused() -> None:
    with pytest.raises(TypeError, match="rate_limit must be"):
        rate_of(True)
    with pytest.raises(TypeError):
        rate_of([100])


def test_split_chunks_keys_and_display() -> None:
    assert share(100.0, 4) == 25.0 and share(None, 4) is None
    assert chunk_cap(200.0) == 10 and chunk_cap(19.0) == 1 and chunk_cap(0.01) == 1
    assert rate_key_of(rate_of) == b"zdq.codec.rates:rate_of"
    assert format_rate(100.0) == "100/s" and format_rate(0.5) == "30/m" and format_rate(None) == "-"


def test_bucket_allows_a_large_chunk_into_debt_and_waits_it_out() -> None:
    b = Bucket(10.0, now=0.0)  # capacity 1 task (0.5 s of rate is under one task)
    assert b.allows(50, 0.0)  # larger than the bucket: goes when the bucket is full
    b.take(50)
    assert not b.allows(1, 1.0)
    assert b.ready_at(1) == pytest.approx(5.0)  # 49 tokens of debt + 1, at 10/s
    assert b.allows(1, 5.0)


def _queue(limits: RateLimits | None = None) -> tuple[MemoryStorage, LeaseTable, RateLimits]:
    storage = MemoryStorage()
    storage.open()
    return storage, LeaseTable(storage), limits or RateLimits(storage)


def test_a_limited_key_is_parked_and_the_others_go_on() -> None:
    storage, leases, rates = _queue()
    put = [(ChunkMeta(D, i, 1, rate_key=b"m:slow", rate=2.0), b"s") for i in range(3)]
    put += [(ChunkMeta(D, 10 + i, 1), b"f") for i in range(3)]
    storage.put_many(put)
    rates.set_key(b"m:slow", 2.0, now=100.0)
    out = [rates.lease(leases, b"c", 100.0) for _ in range(5)]
    got = [o.meta.seq if o else None for o in out]
    assert got == [0, 10, 11, 12, None]  # one slow token, then the fast ones skip the parked slow
    assert rates.wake_at == pytest.approx(100.5) and rates.tasks_throttled == 2
    assert storage.counts().delayed_tasks == 2 and rates.describe()[2] == 2
    assert rates.lease(leases, b"c", 100.4) is None
    assert rates.lease(leases, b"c", 100.5).meta.seq == 1  # type: ignore[union-attr]
    assert rates.lease(leases, b"c", 101.0).meta.seq == 2  # type: ignore[union-attr]
    assert rates.lease(leases, b"c", 200.0) is None and rates.wake_at == math.inf


def test_the_queue_limit_holds_everything_in_order() -> None:
    storage, leases, rates = _queue()
    storage.put_many([(ChunkMeta(D, i, 2), b"x") for i in range(4)])
    rates.set_queue(20.0, now=50.0)  # capacity 1: a chunk of 2 goes when full, then 2 tokens of debt
    t = 50.0
    first = rates.lease(leases, b"c", t)
    assert first is not None and first.meta.seq == 0
    assert rates.lease(leases, b"c", t) is None and rates.wake_at == pytest.approx(t + 0.1)
    assert rates.lease(leases, b"c", t + 0.1).meta.seq == 1  # type: ignore[union-attr]
    assert rates.throttled_seconds == pytest.approx(0.1)


def test_a_key_without_a_limit_is_removed_and_its_chunks_go_back() -> None:
    storage, leases, rates = _queue()
    storage.put_many([(ChunkMeta(D, i, 1, rate_key=b"k", rate=1.0), b"x") for i in range(3)])
    assert rates.lease(leases, b"c", 0.0).meta.seq == 0  # type: ignore[union-attr]
    assert rates.lease(leases, b"c", 0.0) is None
    rates.set_key(b"k", None)  # the key loses its limit: the parked chunks are ready again
    # (the chunks themselves still carry rate 1.0: "the latest rate given wins", so the next one
    # parked brings it back; a purge, acknowledging them, drops them from the parked FIFO.)
    assert storage.counts().ready_tasks == 2


def test_a_cancelled_parked_chunk_is_dropped() -> None:
    storage, leases, rates = _queue()
    ids = storage.put_many([(ChunkMeta(D, i, 1, rate_key=b"k", rate=1.0), b"x") for i in range(3)])
    rates.lease(leases, b"c", 0.0)
    assert rates.lease(leases, b"c", 0.0) is None
    storage.ack_many([ids[1]])  # every task of it cancelled while parked
    assert rates.lease(leases, b"c", 1.0).chunk_id == ids[2]  # type: ignore[union-attr]


def test_a_new_rate_brought_by_a_chunk_wins() -> None:
    storage, leases, rates = _queue()
    rates.set_key(b"k", 1.0, now=0.0)
    storage.put_many([(ChunkMeta(D, 0, 1, rate_key=b"k", rate=100.0), b"x")])
    rates.lease(leases, b"c", 0.0)
    assert rates.keys[b"k"].rate == 100.0


def test_a_durable_queue_keeps_its_limit(tmp_path: object) -> None:
    storage = LMDBStorage(str(tmp_path), sync=False)
    storage.open()
    RateLimits(storage).set_queue(42.0)
    storage.close()
    again = LMDBStorage(str(tmp_path), sync=False)
    again.open()
    assert RateLimits(again).queue.rate == 42.0  # type: ignore[union-attr]
    again.close()


def test_a_queues_limit_and_throttling_reach_the_metrics() -> None:
    pytest.importorskip("prometheus_client", reason="prometheus_client is not installed")
    from zdq.observe import metrics
    from zdq.observe.monitor import Monitor

    from .test_monitor import _ANYONE, _queue

    monitor = Monitor(None, _ANYONE)
    queue = {**_queue("limits-queue-0"), "rate_limit": 50.0, "throttled_tasks": 7, "tasks_throttled": 30,
             "rate_limited_seconds": 2.5}
    monitor.on_report(worker="tcp://a", queues=[queue], consumers=[])
    metrics._monitors.add(monitor)
    try:
        samples = {
            s.name: s.value
            for family in metrics._Collector().collect()
            for s in family.samples
            if s.labels.get("pool") == "limits"
        }
    finally:
        metrics._monitors.discard(monitor)
    assert samples["zdq_rate_limit_tasks_per_second"] == 50.0 and samples["zdq_queue_throttled"] == 7.0
    assert samples["zdq_tasks_throttled_total"] == 30.0 and samples["zdq_rate_limited_seconds_total"] == 2.5
    shown = monitor.status()["pools"]["limits"]["queues"][0]
    assert shown["rate_limit"] == 50.0 and shown["rate_limited_seconds"] == 2.5


def test_a_purged_chunk_takes_no_token_and_leaves_its_parking() -> None:
    storage, leases, rates = _queue()
    ids = storage.put_many([(ChunkMeta(D, i, 2, rate_key=b"k", rate=1.0), b"x") for i in range(3)])
    assert rates.lease(leases, b"c", 0.0) is not None
    assert rates.lease(leases, b"c", 0.0) is None  # the other two are parked
    for chunk_id in ids[1:]:  # what zdq purge does: cancel every task, release what waits
        storage.cancel(chunk_id, range(2))
        storage.release_now(chunk_id)
    assert [rates.lease(leases, b"c", 0.0).chunk_id for _ in range(2)] == ids[1:]  # type: ignore[union-attr]

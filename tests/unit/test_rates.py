"""Rate limits without a cluster: the syntax (zdq.codec.rates), the token bucket, and the queue's
limits over a real in-memory storage (zdq.broker.rates): parked keys, skipping, debts, wake times."""

from __future__ import annotations

import math

import pytest

from zdq.broker.leases import LeaseTable
from zdq.broker.rates import Bucket, RateLimits
from zdq.codec.rates import (
    burst,
    chunk_cap,
    format_rate,
    limited_chunk_size,
    rate_key_of,
    rate_of,
    share,
)
from zdq.errors import ProtocolError
from zdq.storage import ChunkMeta, LMDBStorage, MemoryStorage
from zdq.transport import protocol as p

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
    assert storage.counts().ready_tasks == 2
    # and they go at once: the rate 1.0 they carry was given before the lift, which wins over it
    assert [rates.lease(leases, b"c", 0.0).meta.seq for _ in range(2)] == [1, 2]  # type: ignore[union-attr]
    assert b"k" not in rates.keys and rates.spacing == 0.0


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


# -- issue 25 point 2, review fixes ------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["1e-7/s", "1e10/s", 1e-9, 2e9, "0.001/h"])
def test_absurd_rates_are_refused_with_their_bounds(bad: object) -> None:
    with pytest.raises(ValueError, match=r"rate_limit must be 1e-06 to 1e\+09 tasks per second"):
        rate_of(bad)


def test_a_key_given_as_a_string_must_be_a_key_some_function_has() -> None:
    def local() -> None:
        pass

    # The keys functions have (a nested one's too) are accepted as strings: set_rate_limit(key=)
    # and `zdq rate-limit --key` name them so.
    for made in (rate_key_of(local), rate_key_of(rate_of), rate_key_of(lambda: None), b"__main__:Job.run"):
        assert rate_key_of(made.decode()) == made
    for bad in ("not a name", "module", ":f", "m:", "m:f g", "a..b:f", "m:f.", "m:<a b>", "m:f\n"):
        with pytest.raises(ValueError, match=r"^--key: a rate limit's key must be a function's 'module:qualname'"):
            rate_key_of(bad, "--key")


def test_a_key_over_1024_bytes_is_refused_not_cut() -> None:
    assert rate_key_of("m:" + "x" * 1022) == b"m:" + b"x" * 1022
    with pytest.raises(ValueError, match="1 to 1024 bytes"):
        rate_key_of("m:" + "x" * 1023)
    with pytest.raises(ValueError, match="1 to 1024 bytes"):
        rate_key_of("")


def test_a_pools_chunks_follow_its_slowest_queue_and_go_back_when_lifted() -> None:
    assert limited_chunk_size(1000, [200.0, 20.0]) == 1 and limited_chunk_size(1000, [400.0, None]) == 20
    assert limited_chunk_size(1000, [None, None]) == 1000 and limited_chunk_size(1000, []) == 1000
    assert burst(200.0) == 20.0 and burst(2.0) == 1.0


def test_a_limited_chunk_is_delivered_with_its_spacing_an_unlimited_one_without() -> None:
    storage, leases, rates = _queue()
    storage.put_many([(ChunkMeta(D, 0, 250), b"x"), (ChunkMeta(D, 1, 3, rate_key=b"k", rate=4.0), b"y")])
    rates.set_queue(25.0, now=0.0)
    big = rates.lease(leases, b"c", 0.0)  # larger than the bucket: goes into debt, its tasks spaced
    assert big is not None and big.meta.seq == 0 and rates.spacing == pytest.approx(0.04)
    assert rates.lease(leases, b"c", 9.8) is None  # the debt holds the next back
    keyed = rates.lease(leases, b"c", 10.0)
    assert keyed is not None and rates.spacing == pytest.approx(0.25)  # the slower of key and queue
    rates.set_queue(None)
    storage.put_many([(ChunkMeta(D, 2, 5), b"z")])
    assert rates.lease(leases, b"c", 20.0) is not None and rates.spacing == 0.0


def test_a_key_set_live_wins_over_the_rates_of_chunks_queued_before_not_after() -> None:
    storage, leases, rates = _queue()
    storage.put_many([(ChunkMeta(D, i, 1, rate_key=b"k", rate=1.0), b"x") for i in range(3)])
    rates.set_key(b"k", 100.0, now=0.0)
    rates.lease(leases, b"c", 0.0)
    assert rates.keys[b"k"].rate == 100.0  # the queued chunks' 1/s was given earlier
    storage.put_many([(ChunkMeta(D, 9, 1, rate_key=b"k", rate=1.0), b"x")])  # given again, later
    for t in (1.0, 2.0, 3.0):
        rates.lease(leases, b"c", t)
    assert rates.keys[b"k"].rate == 1.0


def test_deliver_carries_a_spacing_only_when_set() -> None:
    plain, paced = p.Deliver(7, 3, 1, b"c"), p.Deliver(7, 3, 1, b"c", 0.25)
    assert len(p.encode(plain)[0]) < len(p.encode(paced)[0])
    assert p.decode(p.encode(plain)) == plain and p.decode(p.encode(paced)) == paced
    with pytest.raises(ProtocolError, match="spaces its tasks"):
        p.decode(p.encode(p.Deliver(7, 3, 1, b"c", -1.0)))


@pytest.mark.parametrize("rate", [5e-324, 1e-7, 2e9, 1e308])
def test_a_put_or_puts_carrying_a_rate_the_api_refuses_does_not_decode(rate: float) -> None:
    """A peer holding the pool's keys stores no rate a call would refuse: ``5e-324`` made the
    broker's waits infinite (and its monitoring report refused), ``1e308`` lifted a key's limit."""
    put = p.Put(1, 3, b"y" * 600, rate_key=b"m:f", rate=rate)
    for frames in (p.encode(put), p.encode(p.Puts((put,)))):
        with pytest.raises(ProtocolError, match=r"the rate must be 1e-06 to 1e\+09 tasks per second"):
            p.decode(frames)
    for edge in (1e-6, 1e9):  # the bounds themselves travel
        assert p.decode(p.encode(put._replace(rate=edge))) == put._replace(rate=edge)


def test_a_pools_limit_whose_share_per_queue_is_below_the_slowest_rate_is_refused() -> None:
    assert share(2e-6, 2) == 1e-6
    with pytest.raises(ValueError, match=r"split among 4 queues is 5e-07/s each; each queue's part must be 1e-06"):
        share(2e-6, 4)


def test_a_stored_chunks_tags_read_back_whatever_rate_they_hold() -> None:
    """Storage reads the tags an earlier version let in (the bound is the wire's): a durable
    queue still opens."""
    raw = ChunkMeta(D, 1, 3, 0.0, 0, 5, 0.0, b"m:f", 5e-324).pack()
    assert ChunkMeta.unpack(raw).rate == 5e-324

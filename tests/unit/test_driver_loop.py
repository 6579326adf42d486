"""The driver loop's decisions without its thread or sockets: the test plays the thread (it calls
the handlers and requests the thread would run) and stands in for the sockets (what would be sent
is recorded)."""

from __future__ import annotations

import operator
import time
from concurrent.futures import Future
from typing import Any, cast

import pytest

from zdq.client.driver import loop as loop_module
from zdq.client.driver import requests as requests_module
from zdq.client.driver.ledger import Ledger
from zdq.client.driver.links import Links, LinkState
from zdq.client.driver.loop import DriverLoop
from zdq.client.driver.records import Record
from zdq.client.driver.requests import StatusAsk
from zdq.config import settings
from zdq.errors import BrokerLost, BrokerUnreachable, ClosedError, TaskLost
from zdq.futures import CallbackRunner, TaskFuture
from zdq.tasks import PICKLED, dumps_task
from zdq.transport import protocol as p

SETTINGS = settings(window=2, chunk_size=4, connect_timeout=1.0)


class FakeBrokerLinks:
    """What the loop asks of its sockets, recorded."""

    def __init__(self, n: int) -> None:
        self.socks: list[Any] = list(range(n))
        self.replaced: list[tuple[int, str]] = []
        self.disconnected: list[int] = []

    def why(self, i: int) -> str:
        return f"no answer from {i}"

    def replace(self, i: int, endpoint: str) -> None:
        self.replaced.append((i, endpoint))

    def disconnect(self, i: int) -> None:
        self.disconnected.append(i)

    def settle(self, i: int) -> None:
        pass


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, Any]]:
    """The messages the loop sends: (broker, message)."""
    out: list[tuple[int, Any]] = []

    def try_send(sock: int, frames: list[Any]) -> bool:
        out.append((sock, p.decode(frames)))
        return True

    monkeypatch.setattr(loop_module, "try_send", try_send)
    monkeypatch.setattr(requests_module, "try_send", try_send)
    return out


def make(n: int = 2) -> DriverLoop:
    names = [f"q{i}" for i in range(n)]
    ledger = Ledger("p", names, SETTINGS)
    links = Links([f"tcp://h:{i}" for i in range(n)], [""] * n, time.monotonic())
    loop = DriverLoop(
        ledger, links, SETTINGS, name="p", driver_name="p-driver", queue_names=names, identity=b"id",
        keys=None, route=None, callbacks=CallbackRunner("p"),
    )
    loop._bl = FakeBrokerLinks(n)  # type: ignore[assignment]
    return loop


def fake(loop: DriverLoop) -> FakeBrokerLinks:
    return cast(FakeBrokerLinks, loop._bl)


def put_chunk(loop: DriverLoop, n: int = 2, broker: int = 0, *, confirm: bool = True) -> tuple[Record, list[TaskFuture]]:
    ledger = loop._ledger
    base = ledger.reserve(n)
    futs = [TaskFuture(base + i) for i in range(n)]
    [(first, count, payload)] = ledger.chunking.pack(base, [dumps_task((operator.add, (i, 1))) for i in range(n)], None, PICKLED, None)
    ledger.submit_chunk(first, count, payload, futs, 0, timeout=0)
    rec = ledger.take(broker)
    assert rec is not None
    loop._links[broker].unconfirmed += 1
    if confirm:
        loop._handle(loop._links[broker], p.encode(p.Confirm(rec.seq, 100 + rec.seq, p.Status.STORED)))
    return rec, futs


def status(token: int, missing: tuple[int, ...] = ()) -> p.QueueStatus:
    return p.QueueStatus(token, 1, 2, 0, 0, 0, missing)


def token_of(sent: list[tuple[int, Any]], kind: type) -> int:
    token: int = getattr([msg for _, msg in sent if type(msg) is kind][-1], "token")
    return token


def test_a_count_is_settled_once_every_broker_up_has_answered(sent: list[tuple[int, Any]]) -> None:
    loop = make()
    fut: Future[Any] = Future()
    loop.ask_status(StatusAsk([None, None], None, time.monotonic() + 10), fut)
    token = token_of(sent, p.Sync)
    assert [b for b, msg in sent if type(msg) is p.Sync] == [0, 1]
    loop._requests.on_status(loop._links[0], status(token))
    assert not fut.done()
    loop._requests.on_status(loop._links[1], status(token))
    assert fut.result(0) == [status(token), status(token)] and not loop._requests.pending


def test_a_count_of_one_broker_does_not_wait_for_the_others(sent: list[tuple[int, Any]]) -> None:
    loop = make()
    fut: Future[Any] = Future()
    loop.ask_status(StatusAsk([None, None], 1, time.monotonic() + 10), fut)
    loop._requests.on_status(loop._links[1], status(token_of(sent, p.Sync)))
    assert fut.result(0)[1] is not None and fut.result(0)[0] is None


def test_a_count_stops_waiting_for_a_broker_lost_meanwhile(sent: list[tuple[int, Any]]) -> None:
    loop = make()
    fut: Future[Any] = Future()
    loop.ask_status(StatusAsk([None, None], None, time.monotonic() + 10), fut)
    loop._requests.on_status(loop._links[0], status(token_of(sent, p.Sync)))
    loop.broker_lost(1, memory_lost=False)
    assert fut.result(0)[1] is None


def test_a_count_not_answered_by_its_deadline_settles_with_what_came(sent: list[tuple[int, Any]]) -> None:
    loop = make()
    fut: Future[Any] = Future()
    loop.ask_status(StatusAsk([None, None], None, time.monotonic() + 1), fut)
    loop._requests.check_statuses(time.monotonic() + 2)
    assert fut.result(0) == [None, None] and not loop._requests.pending


def test_every_answer_to_a_count_is_kept_for_reprs_even_late_ones(sent: list[tuple[int, Any]]) -> None:
    loop = make()
    loop._requests.on_status(loop._links[1], status(999))
    last = loop.last_counts[1]
    assert last is not None and last[0].ready_tasks == 1 and loop.last_counts[0] is None


def test_a_broker_placed_again_is_asked_which_chunks_it_kept_and_the_others_fail(sent: list[tuple[int, Any]]) -> None:
    loop = make()
    kept, _ = put_chunk(loop)
    lost, futs = put_chunk(loop)
    loop.reconnect(0, "tcp://new:1", "w2")
    assert fake(loop).replaced == [(0, "tcp://new:1")]
    sync = [msg for _, msg in sent if type(msg) is p.Sync][-1]
    assert set(sync.seqs) == {kept.seq, lost.seq}
    loop._handle(loop._links[0], p.encode(status(sync.token, (lost.seq,))))
    assert all(isinstance(f.exception(0), TaskLost) for f in futs)
    assert kept.seq in loop._ledger.records and loop._links[0].state is LinkState.UP


def test_after_a_reroute_the_chunks_the_broker_holds_count_as_confirmed(sent: list[tuple[int, Any]]) -> None:
    loop = make()
    held, _ = put_chunk(loop, confirm=False)
    missing, _ = put_chunk(loop, confirm=False)
    loop.reroute(0)
    token = token_of(sent, p.Sync)
    loop._requests.on_status(loop._links[0], status(token, (missing.seq,)))
    assert held.confirmed and missing.broker == -1 and list(loop._ledger.queued) == [missing]
    assert loop._links[0].unconfirmed == 0


def test_a_cancel_of_a_chunk_sent_back_to_the_queue_is_answered_at_once(sent: list[tuple[int, Any]]) -> None:
    loop = make()
    rec, futs = put_chunk(loop, confirm=False)
    loop.broker_lost(0, memory_lost=False)  # the chunk is queued again
    fut: Future[list[int]] = Future()
    loop.ask_cancel(rec, (0,), fut)
    assert fut.result(0) == [rec.base] and futs[0].cancelled() and not any(type(m) is p.Cancel for _, m in sent)


def test_a_cancel_of_a_chunk_on_a_broker_down_is_answered_empty(sent: list[tuple[int, Any]]) -> None:
    loop = make()
    rec, _ = put_chunk(loop)
    loop.broker_lost(0, memory_lost=False)
    fut: Future[list[int]] = Future()
    loop.ask_cancel(rec, (0, 1), fut)
    assert fut.result(0) == []


def test_a_brokers_answer_to_a_cancel_cancels_the_tasks_it_names(sent: list[tuple[int, Any]]) -> None:
    loop = make()
    rec, futs = put_chunk(loop)
    fut: Future[list[int]] = Future()
    loop.ask_cancel(rec, (0, 1), fut)
    cancel = [msg for _, msg in sent if type(msg) is p.Cancel][-1]
    assert cancel.seq == rec.seq and cancel.chunk_id == rec.chunk_id and cancel.indexes == (0, 1)
    loop._handle(loop._links[0], p.encode(p.Cancelled(cancel.token, (1, 5))))  # 5 was not asked
    assert fut.result(0) == [rec.base + 1] and futs[1].cancelled() and not futs[0].done()


def test_a_lost_brokers_cancels_are_answered_empty_at_once(sent: list[tuple[int, Any]]) -> None:
    loop = make()
    rec, _ = put_chunk(loop)
    fut: Future[list[int]] = Future()
    loop.ask_cancel(rec, (0,), fut)
    loop.broker_lost(0, memory_lost=True)
    assert fut.result(0) == [] and not loop._requests.pending


def test_an_answer_to_no_question_is_counted_as_a_bad_message(sent: list[tuple[int, Any]]) -> None:
    loop = make()
    loop._handle(loop._links[0], p.encode(p.Cancelled(77, (0,))))
    assert loop._outcomes.bad == 1


def test_a_message_a_driver_does_not_accept_is_counted_and_dropped() -> None:
    loop = make()
    assert loop._handle(loop._links[0], p.encode(p.Fetch(1))) is None
    assert loop._outcomes.bad == 1


def test_the_route_table_holds_every_message_a_driver_accepts_but_the_two_tested_first() -> None:
    assert set(make()._routes) == {p.Heartbeat, p.QueueStatus, p.Lost, p.Cancelled, p.Bye, p.Who}


def test_messages_of_a_broker_declared_lost_are_dropped(sent: list[tuple[int, Any]]) -> None:
    loop = make()
    rec, _ = put_chunk(loop, confirm=False)
    loop.broker_lost(0, memory_lost=False)
    loop._handle(loop._links[0], p.encode(p.Confirm(rec.seq, 1, p.Status.STORED)))
    assert not rec.confirmed and loop._outcomes.bad == 0


def test_a_confirm_frees_the_brokers_window_slot(sent: list[tuple[int, Any]]) -> None:
    loop = make()
    put_chunk(loop)
    assert loop._links[0].unconfirmed == 0 and loop._ledger.buffered_chunks == 0


def test_confirms_free_every_slot_they_name_with_one_wake(sent: list[tuple[int, Any]]) -> None:
    loop = make()
    recs = [put_chunk(loop, confirm=False)[0] for _ in range(3)]
    assert loop._links[0].unconfirmed == 3 and loop._ledger.buffered_chunks == 3
    seqs = tuple(r.seq for r in recs[:2])
    loop._handle(loop._links[0], p.encode(p.Confirms(seqs, (100, 101))))
    assert [r.confirmed for r in recs] == [True, True, False] and [r.chunk_id for r in recs[:2]] == [100, 101]
    assert loop._links[0].unconfirmed == 1 and loop._ledger.buffered_chunks == 1
    assert all(r.payload is None for r in recs[:2]) and loop._outcomes.bad == 0


def test_confirms_naming_unknown_chunks_confirm_the_others_and_count_as_bad(sent: list[tuple[int, Any]]) -> None:
    loop = make()
    first, _ = put_chunk(loop, confirm=False)
    other, _ = put_chunk(loop, 2, broker=1, confirm=False)
    # Another broker's chunk, a chunk already confirmed (the same pair twice), one never sent.
    pairs = ((first.seq, 7), (other.seq, 8), (first.seq, 7), (10_000, 9))
    loop._handle(loop._links[0], p.encode(p.Confirms(*map(tuple, zip(*pairs)))))
    assert first.confirmed and first.chunk_id == 7 and not other.confirmed
    assert loop._links[0].unconfirmed == 0 and loop._links[1].unconfirmed == 1 and loop._outcomes.bad == 1


@pytest.mark.parametrize("max_pending", [None, 100])
def test_results_wake_the_waiters_at_the_last_outcome_or_at_each_under_max_pending(
    sent: list[tuple[int, Any]], monkeypatch: pytest.MonkeyPatch, max_pending: int | None
) -> None:
    from zdq.codec.results import dumps_results

    loop = make()
    ledger = loop._ledger
    ledger.max_pending = max_pending
    chunks = [put_chunk(loop) for _ in range(2)]
    wakes: list[int] = []  # how many chunks still await results at each wake
    notify_all = ledger.cond.notify_all
    monkeypatch.setattr(ledger.cond, "notify_all", lambda: (wakes.append(len(ledger.records)), notify_all()))
    for rec, _ in chunks:
        results = dumps_results(rec.base, [1, 2], {}, ledger.payload_key)
        loop._handle(loop._links[0], p.encode(p.Results(rec.seq, rec.chunk_id, b"c" * 16, results)))
        loop._outcomes.settle_all()
    assert [f.result(0) for _, futs in chunks for f in futs] == [1, 2, 1, 2]
    assert wakes == ([0] if max_pending is None else [1, 0]) and ledger.wait_results(0)


def test_a_refused_chunk_fails_its_tasks_and_frees_its_slot(sent: list[tuple[int, Any]]) -> None:
    loop = make()
    rec, futs = put_chunk(loop, confirm=False)
    loop._handle(loop._links[0], p.encode(p.Confirm(rec.seq, 0, p.Status.FULL, b"disk")))
    assert loop._links[0].unconfirmed == 0 and all("is full" in str(f.exception(0)) for f in futs)


def test_a_memory_brokers_loss_fails_its_confirmed_tasks_and_requeues_the_rest(sent: list[tuple[int, Any]]) -> None:
    loop = make()
    _, held = put_chunk(loop)
    unconfirmed, _ = put_chunk(loop, confirm=False)
    loop.broker_lost(0, memory_lost=True)
    assert all(isinstance(f.exception(0), BrokerLost) for f in held)
    assert list(loop._ledger.queued) == [unconfirmed] and fake(loop).disconnected == [0]


def test_a_broker_placed_again_and_silent_fails_what_it_holds(sent: list[tuple[int, Any]]) -> None:
    loop = make()
    _, held = put_chunk(loop)
    loop.reconnect(0, "tcp://new:1", "w")
    loop._tick(loop._bl, time.monotonic() + 5)  # type: ignore[arg-type]
    assert loop._links[0].state is LinkState.UNREACHABLE
    assert all(isinstance(f.exception(0), BrokerUnreachable) for f in held)


def test_a_tick_late_past_the_heartbeat_timeout_says_this_process_paused_and_blames_no_queue(
    sent: list[tuple[int, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    loop = make()
    _, held = put_chunk(loop)
    loop.reconnect(0, "tcp://new:1", "w")  # placed again: its connect-timeout (1 s) runs
    now = time.monotonic()
    with caplog.at_level("WARNING", logger="zdq.client.driver"):
        loop._tick(loop._bl, now + 40, gap=40.0)  # type: ignore[arg-type]
    [said] = [r.getMessage() for r in caplog.records]
    assert said.startswith("p-driver: its I/O thread did not run for 40.0 s (this process was stopped")
    assert all(view.silence < 0.1 for view in loop._links.views)
    # The pause is not the queue's silence: placed again, it still has its connect-timeout.
    assert loop._links[0].state is LinkState.RECOVERING and not any(f.done() for f in held)
    loop._tick(loop._bl, now + 40.5, gap=0.5)  # type: ignore[arg-type]
    assert loop._links[0].state is LinkState.RECOVERING
    loop._tick(loop._bl, now + 41.5, gap=1.0)  # type: ignore[arg-type]
    assert loop._links[0].state is LinkState.UNREACHABLE


def test_a_wait_for_every_broker_to_be_heard_says_why_the_silent_are(sent: list[tuple[int, Any]]) -> None:
    loop = make()
    fut: Future[dict[int, str]] = Future()
    now = time.monotonic()
    loop.wait_heard(now + 1, fut)
    loop._links[0].seen = loop._links[0].connected_at + 0.01
    loop._requests.check_heard(loop._bl, now)  # type: ignore[arg-type]
    assert not fut.done()
    loop._requests.check_heard(loop._bl, now + 2)  # type: ignore[arg-type]
    assert fut.result(0) == {1: "no answer from 1"}


def test_a_wait_for_every_broker_to_be_heard_ends_once_all_are() -> None:
    loop = make()
    for link in loop._links.links:
        link.seen = link.connected_at + 0.01
    fut: Future[dict[int, str]] = Future()
    loop.wait_heard(time.monotonic() + 60, fut)
    assert fut.result(0) == {}


def test_a_loop_that_ends_settles_every_request_still_waiting(sent: list[tuple[int, Any]]) -> None:
    loop = make()
    rec, _ = put_chunk(loop)
    count: Future[Any] = Future()
    loop.ask_status(StatusAsk([None, None], None, time.monotonic() + 60), count)
    cancel: Future[list[int]] = Future()
    loop.ask_cancel(rec, (0,), cancel)
    heard: Future[dict[int, str]] = Future()
    loop.wait_heard(time.monotonic() + 60, heard)
    queued: Future[int] = loop.call(lambda: 1)
    loop._fail_commands()
    loop._requests.end()
    assert isinstance(count.exception(0), ClosedError) and isinstance(heard.exception(0), ClosedError)
    assert cancel.result(0) == [] and isinstance(queued.exception(0), ClosedError)


def test_a_request_posted_after_the_loop_ended_fails_at_once() -> None:
    loop = make()
    loop._ended = True
    fut = loop.call(lambda: 1)
    assert isinstance(fut.exception(0), ClosedError)

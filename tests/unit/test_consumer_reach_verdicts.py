"""What a ConsumerPool holds of its consumers' reach to a queue, judged from their answers, without
a cluster: fake consumers answer ``reach()`` at once, a fake driver says how long it has heard
nothing of each broker. A queue none of them reaches is held (``join()`` raises for it); a
silence the driver shares is not; a cut that healed is seen, and the next cut is asked at once."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import pytest

from zdq.client import consumer_reach
from zdq.client.consumer_reach import SILENT_TO_ALL, ConsumerReach
from zdq.config import settings
from zdq.transport.reach import WENT_SILENT

pytestmark = pytest.mark.unit

QUEUE = "jobs-queue-0"
SILENT = f"{WENT_SILENT} for 2 s"


class FakeDriver:
    def __init__(self) -> None:
        self.silence = [0.1]

    def broker_silence(self, i: int) -> float:
        return self.silence[i]

    def links_up(self) -> list[bool]:
        return [True]


class FakePool:
    name = "jobs"
    dirpath = None
    n_queues = 1
    queue_names = [QUEUE]

    def __init__(self) -> None:
        self.driver = FakeDriver()

    def workers(self) -> list[str]:
        return ["tcp://10.0.0.2:4000"]


class FakeConsumer:
    """Answers ``reach()`` at once: the queue reached, or silent since it was."""

    def __init__(self) -> None:
        self.hears: bool | None = True  # None: still connecting when its wait ended (neither)
        self.fails = False  # its reach call fails (as one that did not answer in time)

    def reach(self, queues: list[str]) -> concurrent.futures.Future[Any]:
        answer: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if self.fails:
            answer.set_exception(TimeoutError("no answer"))
        elif self.hears is None:
            answer.set_result(([], []))
        else:
            answer.set_result(([QUEUE], []) if self.hears else ([], [(QUEUE, "tcp://10.0.0.2:4000", SILENT)]))
        return answer


class FakeConsumers:
    def __init__(self, n: int) -> None:
        self.names = [f"C-{i}" for i in range(n)]
        self.consumers = [FakeConsumer() for _ in range(n)]
        self.slots: Any = None

    def live(self, serving: int | None = None) -> list[tuple[int, str, Any]]:
        return list(zip(range(len(self.names)), self.names, self.consumers))

    def placement(self) -> dict[int, str]:
        return {i: f"tcp://10.0.0.{3 + i}:4000" for i in range(len(self.names))}


def a_reach(n: int = 1) -> tuple[ConsumerReach, FakeConsumers, FakePool]:
    consumers, pool = FakeConsumers(n), FakePool()
    reach = ConsumerReach(consumers, None, pool, settings(heartbeat_interval="250ms", heartbeat_timeout="2s"))  # type: ignore[arg-type]
    return reach, consumers, pool


def rounds(reach: ConsumerReach, silent: set[str] = frozenset(), n: int = 2) -> None:  # type: ignore[assignment]
    """``n`` rounds of the supervisor: the consumers it checked found ``silent`` in the first."""
    for k in range(n):
        reach.supervise_once(True, lambda: False, set(silent) if k == 0 else set())


def test_a_second_cut_after_one_that_healed_is_asked_about_at_once_not_after_the_reask_wait() -> None:
    reach, consumers, _ = a_reach()
    consumers.consumers[0].hears = False
    rounds(reach, {QUEUE})
    assert QUEUE in reach.orphans().get(0, "")  # held: join() raises for it
    consumers.consumers[0].hears = True  # healed: the held queue is asked again until reached
    rounds(reach)
    assert reach.orphans() == {}
    consumers.consumers[0].hears = False  # cut again, seconds later: said and held at once
    rounds(reach, {QUEUE})
    assert QUEUE in reach.orphans().get(0, "")


def test_a_queue_whose_broker_goes_silent_to_this_process_too_is_no_longer_held() -> None:
    reach, consumers, pool = a_reach()
    consumers.consumers[0].hears = False
    rounds(reach, {QUEUE})
    assert 0 in reach.orphans()
    # Its host is now cut off from this process as well (or its worker stopped): silence alone
    # is not a loss, so join() waits for it rather than raising a stale verdict.
    pool.driver.silence[0] = 5.0
    rounds(reach)
    assert reach.orphans() == {} and not reach.still_unreached(0)
    # Nor is it asked about while this process does not hear it either.
    rounds(reach, {QUEUE})
    assert reach.orphans() == {}
    # Heard by this process again, and still not by the consumers: held again.
    pool.driver.silence[0] = 0.1
    rounds(reach, {QUEUE})
    assert 0 in reach.orphans()


def test_a_verdict_of_silences_only_that_the_driver_shares_is_not_held_but_a_connection_failure_is() -> None:
    reach, consumers, pool = a_reach()
    pool.driver.silence[0] = 5.0
    silent = [("C-0", ([], [(QUEUE, "tcp://10.0.0.2:4000", SILENT)]))]
    assert reach._hold_verdict(0, 0, silent) == (False, None, SILENT_TO_ALL)
    never = [("C-0", ([], [(QUEUE, "tcp://10.0.0.2:4000", "a TCP connection was made, but the handshake never completed")]))]
    held, _, why = reach._hold_verdict(0, 0, never)  # start()'s case: never reached, stopped broker
    assert held and "handshake never completed" in why


def test_a_partial_cut_that_healed_is_seen_and_the_next_one_is_said_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(consumer_reach, "_SILENCE_REASK", 0.0)
    reach, consumers, _ = a_reach(2)
    consumers.consumers[1].hears = False
    with caplog.at_level("WARNING", logger="zdq"):
        rounds(reach, {QUEUE})
        assert reach.orphans() == {}  # C-0 reaches it
        consumers.consumers[1].hears = True
        rounds(reach)  # asked again now and then while some consumers cannot reach it: healed
        assert reach._partial_said == {}
        consumers.consumers[1].hears = False
        rounds(reach, {QUEUE})
    said = [r.getMessage() for r in caplog.records if "some consumers of pool jobs cannot reach" in r.getMessage()]
    assert len(said) == 2, said


def test_a_held_queue_is_said_reached_again_only_when_a_consumer_says_it_reaches_it(caplog: pytest.LogCaptureFixture) -> None:
    """CI, under load: the check of a queue held as reached by none got no answer that named it
    (no answer in time, or its consumer still connecting), took that for "reached again", and
    join() waited its whole timeout where it should have raised BrokerUnreachable."""
    reach, consumers, _ = a_reach()
    consumers.consumers[0].hears = False
    rounds(reach, {QUEUE})
    held = reach.orphans()[0]
    with caplog.at_level("WARNING", logger="zdq"):
        consumers.consumers[0].hears = None  # neither reached nor failed when its wait ended
        rounds(reach)
        assert reach.orphans() == {0: held} and reach.still_unreached(0)
        consumers.consumers[0].fails = True  # no answer at all
        rounds(reach)
        assert reach.orphans() == {0: held} and reach.still_unreached(0)
        assert "is reached by consumers of pool jobs again" not in caplog.text
        consumers.consumers[0].fails, consumers.consumers[0].hears = False, True  # it reaches it
        rounds(reach)
    assert reach.orphans() == {} and "queue jobs-queue-0 is reached by consumers of pool jobs again" in caplog.text

"""A consumer's credit at its brokers (prefetch is a bound over all of them), decided without sockets.

:class:`~zdq.consumer.credit.Credit` is driven with an explicit clock; what it sends lands in a
recorder standing for the brokers' sockets.
"""

from __future__ import annotations

import pytest

from zdq.consumer.credit import PARKED as _PARKED
from zdq.consumer.credit import Credit

T0 = 1000.0  # the explicit clock


class Brokers:
    """``n`` brokers as Credit sees them: what it sends to each is recorded here."""

    def __init__(self, n: int) -> None:
        self.sent: list[list[int]] = [[] for _ in range(n)]
        self.connected = [True] * n  # a broker not connected yet cannot take a FETCH

    def send(self, i: int, credit: int) -> bool:
        if not self.connected[i]:
            return False
        self.sent[i].append(credit)
        return True

    def fetches(self) -> list[list[int]]:
        """The credits each broker received since the last call (FETCH 0 withdraws)."""
        out, self.sent = self.sent, [[] for _ in self.sent]
        return out


class Fetching:
    """The consumer's "takes work" switch (an event in the consumer; a flag here)."""

    def __init__(self) -> None:
        self.on = True

    def is_set(self) -> bool:
        return self.on

    def clear(self) -> None:
        self.on = False


@pytest.fixture
def brokers4() -> Brokers:
    return Brokers(4)


def credit_over(brokers: Brokers, prefetch: int, start: int = 0) -> tuple[Credit, Fetching]:
    fetching = Fetching()
    return Credit(brokers.send, len(brokers.sent), prefetch, start, fetching.is_set), fetching


def deliver(credit: Credit, i: int, chunk_id: int) -> None:
    """A DELIVER from broker ``i`` that the consumer keeps."""
    assert credit.credit[i] == 1
    assert credit.delivered(i, chunk_id, T0)


def test_an_idle_consumer_asks_only_prefetch_brokers_starting_where_its_rotation_says(brokers4: Brokers) -> None:
    credit, _ = credit_over(brokers4, prefetch=1, start=2)
    assert credit.ask(T0, eager=False) > T0  # at the bound: the next look is when credit could move
    assert brokers4.fetches() == [[], [], [1], []]
    assert credit.ask(T0 + 0.001, eager=False) and brokers4.fetches() == [[], [], [], []]  # nothing more
    two, _ = credit_over(brokers4, prefetch=2, start=3)
    two.ask(T0, eager=False)
    assert brokers4.fetches() == [[1], [], [], [1]]  # wraps around


def test_with_no_more_brokers_than_prefetch_every_broker_gets_credit() -> None:
    brokers = Brokers(2)
    credit, _ = credit_over(brokers, prefetch=2, start=1)
    credit.ask(T0, eager=False)
    assert brokers.fetches() == [[1], [1]] and credit.outstanding == 2
    deliver(credit, 0, 7)  # one chunk in hand: room for one more, and broker 1 still has credit
    credit.ask(T0 + 0.01, eager=False)
    assert brokers.fetches() == [[], []]
    assert credit.in_flight + credit.outstanding == 2
    # Nothing moves by itself: every broker can hold credit, so none waits for it.
    assert credit.ask(T0 + 10, eager=False) == float("inf") and brokers.fetches() == [[], []]


def test_held_chunks_count_against_the_bound(brokers4: Brokers) -> None:
    credit, _ = credit_over(brokers4, prefetch=2, start=0)
    credit.ask(T0, eager=False)
    assert brokers4.fetches() == [[1], [1], [], []]
    deliver(credit, 0, 1)
    deliver(credit, 1, 2)
    credit.ask(T0 + 0.01, eager=False)
    assert brokers4.fetches() == [[], [], [], []]  # two in hand: no more credit anywhere


def test_a_busy_consumer_holds_its_next_request_back_for_a_done_to_carry() -> None:
    brokers = Brokers(2)
    credit, _ = credit_over(brokers, prefetch=2, start=0)
    credit.ask(T0, eager=False)
    brokers.fetches()
    for i in (0, 1):
        deliver(credit, i, i)
    credit.reported(1, 1)  # chunk 1 is done (its DONE carried no credit): one free place
    assert credit.ask(T0 + 0.0005, eager=False) == pytest.approx(T0 + 0.001)
    assert brokers.fetches() == [[], []]  # held back: the next DONE may carry it
    assert credit.ask(T0 + 0.0005, eager=True) == float("inf")  # unless chunks run long
    assert brokers.fetches() == [[1], []]  # the next in rotation


def test_a_busy_consumer_asks_a_broker_it_is_not_waiting_on_at_once(brokers4: Brokers) -> None:
    credit, _ = credit_over(brokers4, prefetch=2, start=0)
    credit.ask(T0, eager=False)
    brokers4.fetches()
    for i in (0, 1):
        deliver(credit, i, i)
    credit.reported(1, 1)
    credit.ask(T0 + 0.0005, eager=False)
    assert brokers4.fetches() == [[], [], [1], []]


def test_ready_from_a_broker_gets_it_credit_when_there_is_room(brokers4: Brokers) -> None:
    credit, _ = credit_over(brokers4, prefetch=2, start=0)
    credit.ask(T0, eager=False)
    deliver(credit, 0, 1)
    deliver(credit, 1, 2)
    credit.reported(0, 1)  # chunk 1 done, its DONE carried no credit
    brokers4.fetches()
    credit.on_ready(3, T0 + 0.01)
    assert brokers4.fetches() == [[], [], [], [1]]
    credit.on_ready(3, T0 + 0.02)  # it has credit now: nothing more
    assert brokers4.fetches() == [[], [], [], []]


def test_ready_moves_credit_parked_at_an_idle_broker_after_a_while(brokers4: Brokers) -> None:
    credit, _ = credit_over(brokers4, prefetch=1, start=0)
    credit.ask(T0, eager=False)
    assert brokers4.fetches() == [[1], [], [], []]
    credit.on_ready(2, T0 + 0.01)  # broker 0 might still be delivering: not yet
    assert credit.ask(T0 + 0.01, eager=False) == pytest.approx(T0 + _PARKED)
    assert brokers4.fetches() == [[], [], [], []]
    credit.ask(T0 + _PARKED + 0.001, eager=False)
    assert brokers4.fetches() == [[0], [], [1], []]  # withdrawn from 0, given to 2
    assert credit.credit == [0, 0, 1, 0] and credit.outstanding == 1
    # Brokers that say READY are listened to: credit no longer wanders by itself.
    assert credit.ask(T0 + 10, eager=False) == float("inf") and brokers4.fetches() == [[], [], [], []]


def test_ready_at_the_bound_with_every_place_in_hand_waits_for_a_done(brokers4: Brokers) -> None:
    credit, _ = credit_over(brokers4, prefetch=1, start=0)
    credit.ask(T0, eager=False)
    deliver(credit, 0, 1)
    brokers4.fetches()
    credit.on_ready(3, T0 + 0.01)
    assert credit.ask(T0 + 1, eager=False) == float("inf")
    assert brokers4.fetches() == [[], [], [], []]
    credit.reported(0, 1)  # the chunk is done: the broker that said READY is asked first
    credit.ask(T0 + 1.01, eager=False)
    assert brokers4.fetches() == [[], [], [], [1]]


def test_without_ready_parked_credit_visits_every_broker_in_turn(brokers4: Brokers) -> None:
    credit, _ = credit_over(brokers4, prefetch=1, start=0)
    now = T0
    credit.ask(now, eager=False)
    visited = [i for i, got in enumerate(brokers4.fetches()) if got == [1]]
    for _ in range(3):
        now += _PARKED + 0.001
        credit.ask(now, eager=False)
        got = brokers4.fetches()
        assert sum(c == [0] for c in got) == 1 and sum(c == [1] for c in got) == 1  # one move at a time
        visited += [i for i, c in enumerate(got) if c == [1]]
        assert credit.outstanding == 1 and sum(credit.credit) == 1
    assert visited == [0, 1, 2, 3]


def test_a_cancelled_consumer_withdraws_its_credit(brokers4: Brokers) -> None:
    credit, fetching = credit_over(brokers4, prefetch=2, start=1)
    credit.ask(T0, eager=False)
    brokers4.fetches()
    fetching.clear()
    assert credit.ask(T0 + 0.01, eager=False) == float("inf")
    assert brokers4.fetches() == [[], [0], [0], []] and credit.outstanding == 0




def test_a_deliver_beyond_the_bound_is_to_be_given_back_and_changes_nothing(brokers4: Brokers) -> None:
    credit, _ = credit_over(brokers4, prefetch=1, start=0)
    credit.ask(T0, eager=False)
    deliver(credit, 0, 1)
    assert not credit.delivered(2, 9, T0)  # it raced a withdrawal
    assert credit.in_flight == 1 and credit.held == [{1}, set(), set(), set()] and credit.outstanding == 0


def test_a_done_carries_the_next_credit_when_there_is_room_and_not_when_it_did_not_leave(brokers4: Brokers) -> None:
    credit, _ = credit_over(brokers4, prefetch=1, start=0)
    credit.ask(T0, eager=False)
    deliver(credit, 0, 1)
    assert credit.done(0, 1)  # its place is free: the DONE asks for the next chunk
    assert credit.credit[0] == 1 and credit.outstanding == 1 and credit.in_flight == 0
    assert brokers4.fetches() == [[1], [], [], []]  # the first FETCH only: the credit rode on the DONE
    credit.unsent(0)  # the DONE did not leave
    assert credit.credit[0] == 0 and credit.outstanding == 0


def test_a_done_leaves_the_credit_to_a_broker_that_said_ready(brokers4: Brokers) -> None:
    credit, _ = credit_over(brokers4, prefetch=1, start=0)
    credit.ask(T0, eager=False)
    deliver(credit, 0, 1)
    credit.on_ready(3, T0)  # at the bound: broker 3 waits for room
    assert not credit.done(0, 1)
    credit.ask(T0 + 0.001, eager=False)
    assert brokers4.fetches() == [[1], [], [], [1]]


def test_a_cancelled_consumer_asks_for_nothing_and_its_dones_carry_no_credit(brokers4: Brokers) -> None:
    credit, fetching = credit_over(brokers4, prefetch=1, start=0)
    credit.ask(T0, eager=False)
    deliver(credit, 0, 1)
    fetching.clear()
    assert not credit.done(0, 1)
    credit.on_ready(2, T0)
    assert credit.ask(T0 + 1, eager=False) == float("inf")
    assert brokers4.fetches() == [[1], [], [], []] and credit.outstanding == 0


def test_a_broker_not_connected_yet_is_passed_over_and_asked_once_it_is(brokers4: Brokers) -> None:
    credit, _ = credit_over(brokers4, prefetch=1, start=0)
    brokers4.connected[0] = False
    credit.ask(T0, eager=False)
    assert brokers4.fetches() == [[], [1], [], []] and credit.credit == [0, 1, 0, 0]


def test_a_replaced_broker_is_forgotten_with_the_chunks_held_from_it(brokers4: Brokers) -> None:
    credit, _ = credit_over(brokers4, prefetch=2, start=0)
    credit.ask(T0, eager=False)
    deliver(credit, 0, 1)
    credit.forget(0)
    assert credit.in_flight == 0 and credit.outstanding == 1 and credit.credit == [0, 1, 0, 0]
    credit.reported(0, 1)  # its DONE to the replacement frees nothing twice
    assert credit.in_flight == 0

"""A consumer's credit at its brokers: what to ask each for, decided without sockets.

:class:`Credit` is pure: events come in as calls (a DELIVER kept, a chunk reported, a broker saying
READY or BYE, a broker replaced, the clock), and its decisions go out through one port, ``send(i,
credit)`` (ask broker ``i`` for ``credit`` more chunks; 0 withdraws every credit given there), which
says whether the request left. :class:`~zdq.consumer.link.Link` runs it on the socket owner and
does the sending; the unit tests run it with a recorder and an explicit clock.

The rules: a consumer asks for at most ``prefetch`` chunks in all (chunks held + credit outstanding
<= prefetch, over every broker), one outstanding request per broker at most, from its brokers in
rotation. A broker where work waits and this consumer has no credit says READY; the consumer then
asks it, or moves a credit that sits unused at another broker (withdrawn with ``FETCH 0``) to it.
A DELIVER beyond the bound (one that raced a withdrawal) is to be given back at once. Until a
broker is heard saying READY (brokers that do not), a consumer with more brokers than ``prefetch``
moves a credit that sat unused for ``PARKED`` to the next broker in rotation, so no queue waits for
long.

Who owns what
-------------
Everything here belongs to the socket owner (see :mod:`zdq.consumer`), the only caller. The actor
reads ``in_flight`` for its statistics (an int: a torn read cannot happen).
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["EAGER_FETCH", "FETCH_DELAY", "PARKED", "Credit"]

#: How long a busy consumer holds back its request for the next chunk of a broker, waiting for a
#: DONE to that broker to carry it: one message and one broker round fewer per chunk when chunks
#: are short (a single task's round trip), and a prefetch that is still on time when they are long.
FETCH_DELAY = 0.001
#: Chunks that take at least this long to run (on average) make a consumer ask for the next ones as
#: soon as it starts one: the request's broker round is hidden behind the run.
EAGER_FETCH = 0.00025
#: Credit unused at a broker for this long is *parked* there: that broker has no work, and the
#: credit may move to one that has (a broker's round is well under a millisecond, so 50 ms of
#: silence is not a DELIVER on its way).
PARKED = 0.05


class Credit:
    """What the consumer asked each broker for, and holds from each; which broker to ask next.

    Parameters
    ----------
    send : Callable[[int, int], bool]
        Sends ``FETCH credit`` to broker ``i``; True if it left (a broker not connected yet
        cannot take it: the credit is not counted, and is asked for again).
    n : int
        Number of brokers.
    prefetch : int
        The bound on chunks held plus credit outstanding, over all brokers.
    start : int
        Where the rotation starts (consumers start at different brokers).
    fetching : Callable[[], bool]
        Whether the consumer takes work now (False once cancelled: its credit is withdrawn).

    Examples
    --------
    >>> sent = []
    >>> credit = Credit(lambda i, c: sent.append((i, c)) is None, 3, 1, 0, lambda: True)
    >>> credit.ask(0.0, eager=False) > 0.0 and sent
    [(0, 1)]
    """

    __slots__ = (
        "asked_at", "credit", "fetch_at", "fetching", "held", "in_flight", "next", "outstanding",
        "prefetch", "rebalance_at", "rotate", "send", "wanted",
    )

    def __init__(
        self, send: Callable[[int, int], bool], n: int, prefetch: int, start: int, fetching: Callable[[], bool]
    ) -> None:
        self.send = send
        self.prefetch = prefetch
        self.fetching = fetching
        #: ``credit[i]`` is 0 or 1: one outstanding request per broker at most.
        self.credit = [0] * n
        self.held: list[set[int]] = [set() for _ in range(n)]  # chunks received and not yet reported
        self.fetch_at = [0.0] * n  # when a busy consumer's FETCH goes out on its own (FETCH_DELAY)
        # When the credit at each broker was given: 0.0 for credit that rode on a DONE (no clock
        # was read), stamped when first looked at, so it is never taken for parked too early.
        self.asked_at = [0.0] * n
        self.in_flight = 0  # chunks held, over all brokers
        self.outstanding = 0  # sum(credit)
        self.next = start % n if n else 0  # the broker asked first next time (rotation)
        self.wanted: set[int] = set()  # brokers that said READY and have no credit: served first
        # Without READY from brokers, parked credit moves around on its own (only useful when
        # some broker must go without credit: more brokers than prefetch).
        self.rotate = n > prefetch
        self.rebalance_at = 0.0  # no credit can be moved before this

    # -- the clock ------------------------------------------------------------------------------
    def ask(self, now: float, *, eager: bool) -> float:
        """Send the FETCHes due; return when the next one held back (or a move) falls due.

        Brokers are asked in rotation while ``held + outstanding < prefetch``, those that said
        READY first. A consumer with nothing in hand asks at once (so does an ``eager`` one); a busy
        one lets its next DONE to that broker carry the request, unless that takes longer than
        FETCH_DELAY. At the bound, credit parked at one broker may move to another.
        """
        if not self.fetching():
            if self.outstanding:  # cancelled: let the brokers serve others
                for k, c in enumerate(self.credit):
                    if c:
                        self._withdraw(k)
            return math.inf
        prefetch = self.prefetch
        if self.in_flight + self.outstanding < prefetch:
            credit, fetch_at = self.credit, self.fetch_at
            if self.wanted:
                for j in list(self.wanted):
                    self.wanted.discard(j)
                    if credit[j] == 0 and self.in_flight + self.outstanding < prefetch:
                        self._give(j, now)
            due = math.inf
            n = len(credit)
            i = self.next
            for _ in range(n):
                if self.in_flight + self.outstanding >= prefetch:
                    break
                if credit[i] == 0:
                    if eager or self.in_flight == 0 or now >= fetch_at[i]:
                        self._give(i, now)
                    else:
                        due = min(due, fetch_at[i])
                i = i + 1 if i + 1 < n else 0
            if self.in_flight + self.outstanding < prefetch:
                return due
        if self.outstanding and (self.wanted or self.rotate):  # credit that could move
            return self._rebalance(now) if now >= self.rebalance_at else self.rebalance_at
        return math.inf

    # -- chunks in and out ----------------------------------------------------------------------
    def delivered(self, i: int, chunk_id: int, now: float) -> bool:
        """Broker ``i`` delivered ``chunk_id``: True to keep it, False to give it back (it came
        beyond the bound, having raced a withdrawal; a RETURN costs it no attempt)."""
        if self.credit[i]:
            self.credit[i] = 0
            self.outstanding -= 1
        elif self.in_flight + self.outstanding >= self.prefetch:
            return False
        self.fetch_at[i] = now + FETCH_DELAY
        self.asked_at[i] = 0.0
        self.in_flight += 1
        self.held[i].add(chunk_id)
        return True

    def reported(self, i: int, chunk_id: int) -> None:
        """A RETURN, SPLIT or DONE of ``chunk_id`` left for broker ``i``: its place is free."""
        held = self.held[i]
        if chunk_id in held:
            held.discard(chunk_id)
            self.in_flight -= 1

    def done(self, i: int, chunk_id: int) -> bool:
        """A DONE of ``chunk_id`` goes to broker ``i``: its place is free; True if the DONE is to
        carry a credit (a FETCH riding along, counted here; :meth:`unsent` takes it back)."""
        held = self.held[i]
        if chunk_id in held:
            held.discard(chunk_id)
            self.in_flight -= 1
        wanted = self.wanted
        if (
            self.credit[i] == 0
            and self.in_flight + self.outstanding < self.prefetch
            and self.fetching()
            and (not wanted or i in wanted)  # else a broker that said READY gets the credit
        ):
            if wanted:
                wanted.discard(i)
            self.credit[i] = 1
            self.outstanding += 1
            return True
        return False

    def unsent(self, i: int) -> None:
        """The DONE that was to carry a credit to broker ``i`` did not leave: the credit is not
        counted."""
        self.outstanding -= self.credit[i]
        self.credit[i] = 0

    # -- what brokers say -----------------------------------------------------------------------
    def on_ready(self, j: int, now: float) -> None:
        """Broker ``j`` has work and no credit from us."""
        self.rotate = False  # brokers say READY: parked credit moves only when one does
        if self.credit[j] or not self.fetching():
            return
        if self.in_flight + self.outstanding < self.prefetch:
            self._give(j, now)
        else:
            self.wanted.add(j)
            self.rebalance_at = 0.0

    def on_bye(self, i: int) -> None:
        """Broker ``i`` is going away; ask again if it comes back."""
        self.outstanding -= self.credit[i]
        self.credit[i] = 0

    def forget(self, i: int) -> None:
        """Broker ``i`` was replaced: the chunks held from it leave the credit count (the runner
        starts none of them: the replacement serves them again from storage, see
        :meth:`~zdq.consumer.runner.Runner.broker_replaced`)."""
        self.on_bye(i)
        self.fetch_at[i] = 0.0
        self.in_flight -= len(self.held[i])
        self.held[i].clear()
        self.wanted.discard(i)

    # -- decisions ------------------------------------------------------------------------------
    def _give(self, i: int, now: float) -> None:
        if self.send(i, 1):
            self.credit[i] = 1
            self.outstanding += 1
            self.asked_at[i] = now
            self.next = i + 1 if i + 1 < len(self.credit) else 0

    def _withdraw(self, k: int) -> None:
        # Whether or not the broker gets it, the credit is no longer counted: a DELIVER that comes
        # anyway is taken if there is room, else given back.
        self.send(k, 0)
        self.credit[k] = 0
        self.outstanding -= 1

    def _rebalance(self, now: float) -> float:
        """At the bound: move credit parked at a broker to one that has work (said READY, or,
        when brokers do not, the next in rotation). Returns when to look again."""
        credit, asked_at = self.credit, self.asked_at
        while True:
            oldest, source = math.inf, -1
            for k, c in enumerate(credit):
                if c:
                    if asked_at[k] == 0.0:
                        asked_at[k] = now
                    if asked_at[k] < oldest:
                        oldest, source = asked_at[k], k
            if source < 0:  # every chunk of the bound is in hand: a DONE will free room
                self.rebalance_at = 0.0
                return math.inf
            if now - oldest < PARKED:
                self.rebalance_at = oldest + PARKED
                return self.rebalance_at
            target = self._target()
            if target < 0:
                self.rebalance_at = now + PARKED
                return self.rebalance_at
            self._withdraw(source)
            self._give(target, now)
            if not self.wanted:  # moves in rotation go one at a time, one per PARKED
                self.rebalance_at = now + PARKED
                return self.rebalance_at

    def _target(self) -> int:
        """The broker that should have the next credit moved: one that said READY, else (while no
        broker says READY) the next in rotation that holds no credit and none of our chunks."""
        while self.wanted:
            j = self.wanted.pop()
            if self.credit[j] == 0:
                return j
        if self.rotate:
            n = len(self.credit)
            for step in range(n):
                j = (self.next + step) % n
                if self.credit[j] == 0 and not self.held[j]:
                    return j
        return -1

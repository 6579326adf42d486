"""The driver's view of each broker: a small state machine per link, with no sockets.

::

                 broker_lost                       reconnect (placed again)
        UP ─────────────────────▶ DOWN ─────────────────────────────▶ RECOVERING
        ▲  ◀──────────────────────────────────────── any message ──────────┘ │
        │                                                                    │ silent for
        └───────────── any message ─────────── UNREACHABLE ◀─────────────────┘ connect-timeout

A link also counts the chunks sent to its broker and not confirmed (the per-broker window), when
the broker was last heard from and last confirmed, and the receipts (RACK) owed to it, sent in
batches. :class:`Links` picks the broker of the next chunk (round robin, passing over brokers
down or stalled) and publishes a :class:`LinkView` snapshot for the other threads.

A broker's silence is measured by the I/O thread's clock: up to its last heartbeat tick
(``LinkView.silence``), never up to "now" as another thread reads it. When the I/O thread itself
did not run (its process stopped, or starved of CPU or the GIL), what the brokers sent meanwhile
is still unread: that time is not theirs to be blamed for. Its next tick, late, restarts every
link's clocks (:meth:`Links.paused`), as the broker does for its peers after its own deafness.

Who owns what
-------------
===========================================  ======================================================
state                                        owner
===========================================  ======================================================
every :class:`Link` field, ``Links.rr``      the driver's I/O thread alone (no lock: nobody else
                                             touches them)
``Links.views`` (a tuple of LinkView)        written by the I/O thread (replaced whole on every
                                             state change and every heartbeat tick); read by any
                                             thread without a lock: a reference read is atomic, and
                                             the tuple never changes once published
``Links.ticked_at``                          the I/O thread (its heartbeat tick)
===========================================  ======================================================

>>> links = Links(["tcp://a:1", "tcp://b:2"], ["w1", "w2"], now=0.0)
>>> links.pick(window=1), links.pick(window=1)
(0, 1)
>>> links.lost(0)
True
>>> [view.state.value for view in links.views]
['down', 'up']
"""

from __future__ import annotations

import enum
import logging
import time
from typing import NamedTuple

__all__ = ["Link", "LinkState", "LinkView", "Links", "RACK_BATCH", "RACK_DELAY", "STALLED"]

logger = logging.getLogger(__name__)

#: Receipts for results (RACK) are batched: sent when this many are owed to a broker, or when the
#: oldest has waited this long. Until then the broker keeps those chunks, so a broker that restarts
#: in that window runs them again (at least once, as ever); one RACK per result would cost a
#: message and a broker round per chunk, which on a single-task round trip is a fifth of the work.
RACK_BATCH = 256
RACK_DELAY = 0.02

#: A broker whose window stays full this long without a confirm is stalled (stopped, starved):
#: round robin passes it over so the other queues take the work. Healthy brokers confirm within
#: milliseconds, so the daskqueue evenness (100 chunks over 2 queues: 50 and 50) holds otherwise.
#: Not shorter: a durable broker's synced commit on a busy disk, or its worker starved of CPU on
#: a loaded host, was seen to hold its confirms over 0.5 s, and the queues came out 84 and 16
#: where daskqueue's own tests expect 50 and 50.
STALLED = 2.0


class LinkState(enum.Enum):
    """The driver's view of one broker."""

    UP = "up"  # connected (or connecting, at the start): chunks are sent to it
    DOWN = "down"  # lost with its worker: nothing is sent until the pool places it again
    RECOVERING = "recovering"  # placed again: resends and a SYNC go out; new chunks once it answers
    UNREACHABLE = "unreachable"  # placed again, and silent for connect-timeout: its tasks failed


class Link:
    """The I/O thread's link to one broker."""

    __slots__ = (
        "index", "endpoint", "worker", "state", "unconfirmed", "seen", "connected_at", "racks", "confirmed_at",
    )

    def __init__(self, index: int, endpoint: str, worker: str, now: float) -> None:
        self.index = index
        self.endpoint = endpoint
        self.worker = worker  # the Dask worker it runs on, for errors ("" if unknown)
        self.state = LinkState.UP
        self.unconfirmed = 0  # chunks sent to it and not yet confirmed
        self.seen = now  # when it was last heard from
        # When this connection was made: the broker has answered it once seen is later.
        self.connected_at = now
        self.racks: list[int] = []  # receipts owed to it
        self.confirmed_at = now  # when it last confirmed a chunk

    @property
    def heard(self) -> bool:
        """Whether its broker answered since this connection was made (its answer to our HELLO)."""
        return self.seen > self.connected_at

    def view(self, as_of: float) -> LinkView:
        return LinkView(
            self.state, self.seen, self.heard, self.unconfirmed, self.confirmed_at, self.endpoint, self.worker, as_of
        )


class LinkView(NamedTuple):
    """A link as the I/O thread last published it (for the other threads)."""

    state: LinkState
    seen: float
    heard: bool
    unconfirmed: int
    confirmed_at: float
    endpoint: str
    worker: str
    as_of: float  # the I/O thread's last heartbeat tick when this was published

    @property
    def silence(self) -> float:
        """Seconds its broker had been silent at the I/O thread's last tick: a time the I/O
        thread did not run (and read nothing) is not counted until it has run again."""
        return max(0.0, self.as_of - self.seen)


class Links:
    """Every link of one driver, and the round robin over them (the I/O thread's)."""

    def __init__(self, endpoints: list[str], workers: list[str], now: float) -> None:
        self.links = [Link(i, e, w, now) for i, (e, w) in enumerate(zip(endpoints, workers))]
        self.rr = 0
        self.views: tuple[LinkView, ...] = ()
        self.ticked_at = now  # the I/O thread's last heartbeat tick
        self.publish()

    def __getitem__(self, index: int) -> Link:
        return self.links[index]

    def __len__(self) -> int:
        return len(self.links)

    def publish(self) -> None:
        """Replace the snapshot the other threads read."""
        as_of = self.ticked_at
        self.views = tuple(link.view(as_of) for link in self.links)

    def ticked(self, now: float) -> None:
        """The I/O thread's heartbeat tick at ``now``: silences are measured up to here."""
        self.ticked_at = now
        self.publish()

    def paused(self, gap: float, now: float) -> None:
        """The I/O thread did not run for ``gap`` seconds: what the brokers sent meanwhile is
        unread, so no link's clock counts that time. A link heard is heard now; one not heard since
        its connection (a broker placed again, within its connect-timeout) and every link's last
        confirm (round robin's stall) move on by ``gap``. A broker that did stop meanwhile is found
        silent a heartbeat timeout later."""
        for link in self.links:
            if link.heard:
                link.seen = now
            else:  # seen == connected_at until it is heard: both move, it stays unheard
                link.seen = link.connected_at = min(now, link.connected_at + gap)
            link.confirmed_at = min(now, link.confirmed_at + gap)

    # -- sending ---------------------------------------------------------------------------------
    def pick(self, window: int) -> int | None:
        """The broker of the next chunk, or None: every broker is down or full (chunks wait, bounded,
        for room), or the next is full but confirming (wait for it).

        Strict round robin keeps queues even (the daskqueue behaviour: 100 chunks over 2 queues is
        50 and 50): a full window on the next broker waits for its confirms. But a broker that is
        down, or stalled (its window full and no confirm for :data:`STALLED`), is passed over: one
        queue never holds up a pool's submissions.
        """
        links = self.links
        n = len(links)
        up = LinkState.UP
        b = self.rr
        link = links[b]
        if link.state is not up or link.unconfirmed >= window:
            if link.state is up and time.monotonic() - link.confirmed_at < STALLED:
                return None
            for _ in range(n - 1):
                b = (b + 1) % n
                link = links[b]
                if link.state is up and link.unconfirmed < window:
                    break
            else:
                return None
        self.rr = (b + 1) % n
        link.unconfirmed += 1
        return b

    def unsent(self, broker: int, n: int = 1) -> None:
        """The ``n`` chunks picked for ``broker`` could not be sent now (its socket is full)."""
        self.links[broker].unconfirmed -= n
        self.rr = (broker + 1) % len(self.links)

    # -- receipts --------------------------------------------------------------------------------
    def take_racks(self) -> list[tuple[int, tuple[int, ...]]]:
        """The receipts to send now, by broker up; those owed to a broker not up are dropped."""
        out = []
        for link in self.links:
            if link.racks:
                if link.state is LinkState.UP:
                    out.append((link.index, tuple(link.racks)))
                link.racks.clear()
        return out

    # -- transitions -----------------------------------------------------------------------------
    def _set(self, link: Link, state: LinkState) -> None:
        link.state = state
        self.publish()

    def answered(self, link: Link) -> None:
        """A message came from a link RECOVERING or UNREACHABLE: the broker placed again answers,
        it takes work (a DOWN link's messages are dropped before: a broker declared lost)."""
        self._set(link, LinkState.UP)

    def lost(self, broker: int) -> bool:
        """Broker ``broker`` died: nothing more is sent to it; what it was sent and did not confirm
        is the ledger's to queue again. False if it was down already."""
        link = self.links[broker]
        if link.state is LinkState.DOWN:
            return False
        link.racks.clear()  # the broker that owed them is gone
        link.unconfirmed = 0
        self._set(link, LinkState.DOWN)
        return True

    def reconnected(self, broker: int, endpoint: str, worker: str, now: float) -> None:
        """Broker ``broker`` was placed again at ``endpoint``: RECOVERING until it answers."""
        link = self.links[broker]
        link.endpoint = endpoint
        link.worker = worker
        link.seen = link.connected_at = now
        link.racks.clear()  # the replacement does not know those chunks
        link.unconfirmed = 0
        self._set(link, LinkState.RECOVERING)

    def rerouted(self, broker: int, now: float) -> bool:
        """The path to broker ``broker`` changed (a new relay): a new connection. False if the
        broker is down (its placement again reconnects it)."""
        link = self.links[broker]
        if link.state is LinkState.DOWN:
            return False
        link.seen = link.connected_at = now
        self.publish()
        return True

    def resolved(self, broker: int, n: int) -> None:
        """``n`` chunks sent to ``broker`` are no longer unconfirmed (stored, or sent again)."""
        self.links[broker].unconfirmed -= n

    def due_unreachable(self, now: float, connect_timeout: float) -> list[Link]:
        """Links placed again that have not answered within ``connect_timeout``: now UNREACHABLE."""
        due = [
            link for link in self.links
            if link.state is LinkState.RECOVERING and not link.heard and now - link.connected_at >= connect_timeout
        ]
        for link in due:
            link.unconfirmed = 0
            self._set(link, LinkState.UNREACHABLE)
        return due

    def all_unreachable(self) -> bool:
        return all(link.state is LinkState.UNREACHABLE for link in self.links)

    def silent(self) -> list[int]:
        """The brokers not heard since their connection was made."""
        return [link.index for link in self.links if not link.heard]


def names_down(views: tuple[LinkView, ...], names: list[str]) -> list[str]:
    """The names of the queues not up, from a published snapshot."""
    return [name for name, view in zip(names, views) if view.state is not LinkState.UP]


def explain_full(views: tuple[LinkView, ...], names: list[str], window: int, now: float) -> str:
    """What the links say about a full buffer (for SubmitTimeout), from a published snapshot."""
    why = ""
    down = names_down(views, names)
    if down:
        why += f"; queues {', '.join(down)} are down (their workers were lost) and being placed again"
    stalled = [
        name for name, view in zip(names, views)
        if view.state is LinkState.UP and view.unconfirmed >= window and now - view.confirmed_at >= STALLED
    ]
    if stalled:
        why += (
            f"; queues {', '.join(stalled)} have confirmed nothing for a while (their workers are stopped, "
            "or too busy to serve them)"
        )
    return why

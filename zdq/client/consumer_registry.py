"""The consumers of a queue pool, as the queue pool knows them: owned by the QueuePool.

Before, a ConsumerPool wrote three of its QueuePool's attributes (``consumer_batch_size``,
``consumer_identities``, the listeners); now it goes through this registry's public methods,
and a second QueuePool of this process on the same live pool shares its owner's registry (see
:meth:`zdq.QueuePool.start`): the consumers of either are known to both.

Ownership
---------
=========================  =========================================================================
state                      owner
=========================  =========================================================================
``_pools``                 ``_lock`` (ConsumerPools subscribe from the user's thread; the queue
                           pool's supervisor reads them to tell them of a queue's move)
``_identities``            ``_lock`` (added when a consumer is placed, by a user's or a supervisor
                           thread; read by ``results()``)
``_feeders``               ``_lock``: the QueuePools of this process on the pool (weakly), added
                           when their drivers start
``batch_size``             the user's thread (a ConsumerPool's constructor), read when cutting
                           chunks: a plain attribute, last writer wins, as daskqueue's did
=========================  =========================================================================
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable
from typing import Any, Protocol

from zdq.client.driver import NO_CONSUMER, Driver
from zdq.errors import BrokerUnreachable

__all__ = ["ConsumerRegistry", "ConsumerListener", "Feeder"]

logger = logging.getLogger(__name__)


class ConsumerListener(Protocol):
    """What the registry needs of a ConsumerPool (no import of it: no import cycle)."""

    n_consumers: int

    @property
    def running(self) -> bool: ...

    @property
    def closed(self) -> bool: ...

    def on_broker_moved(self, broker: int, endpoint: str) -> None: ...


class Feeder(Protocol):
    """A QueuePool of this process that feeds the pool (its driver gets the results of its tasks)."""

    def live_driver(self) -> Driver | None: ...


class ConsumerRegistry:
    """The ConsumerPools of one live pool in this process, and every consumer identity they
    placed (held weakly, but a started one strongly until it is closed: see :meth:`keep`)."""

    def __init__(self, pool_name: str) -> None:
        self._pool_name = pool_name
        self._lock = threading.Lock()
        self._pools: list[weakref.ref[ConsumerListener]] = []
        self._kept: dict[int, ConsumerListener] = {}  # started, not closed: held (see keep())
        self._identities: set[bytes] = set()
        self._feeders: list[weakref.ref[Any]] = []
        #: The batch size of the newest ConsumerPool (daskqueue's ``batch_size``): caps the chunks
        #: submitted from then on, so that a consumer takes at most that many tasks at once.
        self.batch_size: int | None = None

    def add_feeder(self, pool: Feeder) -> None:
        with self._lock:
            self._feeders = [ref for ref in self._feeders if ref() is not None]
            self._feeders.append(weakref.ref(pool))

    def drivers(self) -> list[Driver]:
        """The live drivers of this process on the pool, oldest first: each has the results of
        its own tasks, whichever consumer ran them."""
        with self._lock:
            feeders = [ref() for ref in self._feeders]
        drivers = [f.live_driver() for f in feeders if f is not None]
        return [d for d in drivers if d is not None and not d.stopped]

    def results_for(self, identities: Iterable[bytes]) -> dict[int, Any]:
        """The results these consumers produced, gathered from every driver (task ids never repeat
        across drivers)."""
        wanted = list(identities)
        out: dict[int, Any] | None = None
        for driver in self.drivers():
            # The first driver's answer may be its folded dict itself, handed over; the others'
            # are written into it: no copy of a million results.
            out = driver.results_for(wanted, into=out)
        return {} if out is None else out

    def start_folding(self) -> None:
        """Every driver keeps its results folded by task id from now on: a ``join()`` comes before
        ``results()`` (see :mod:`~zdq.client.driver.outcomes`)."""
        for driver in self.drivers():
            driver.start_folding()

    def done_count(self, identities: Iterable[bytes]) -> int:
        wanted = list(identities)
        return sum(driver.done_count(wanted) for driver in self.drivers())

    def not_run(self) -> dict[int, Any]:
        """Tasks that failed without running (their value is the error)."""
        return self.results_for([NO_CONSUMER])

    def earlier_producers(self) -> set[bytes]:
        """Consumers no ConsumerPool of this process placed (a durable queue kept their results
        from before a restart). Not :data:`NO_CONSUMER`: tasks that never ran (expired, lost,
        refused) are :meth:`not_run`'s, and no consumer consumed them."""
        found: set[bytes] = set()
        for driver in self.drivers():
            found |= driver.producers()
        return found - self.identities() - {NO_CONSUMER}

    def keep(self, pool: ConsumerListener) -> None:
        """Hold a started ConsumerPool until it is closed (:meth:`let_go`): one made and started
        without a name kept for it (``ConsumerPool(client, queue_pool, 4, start=True)``) serves
        while its QueuePool is open, as a started thread pool runs unreferenced."""
        with self._lock:
            self._kept[id(pool)] = pool

    def let_go(self, pool: ConsumerListener) -> None:
        with self._lock:
            self._kept.pop(id(pool), None)

    def subscribe(self, pool: ConsumerListener) -> None:
        with self._lock:
            self._pools = [ref for ref in self._pools if ref() is not None]
            self._pools.append(weakref.ref(pool))

    def pools(self) -> list[ConsumerListener]:
        """The live ConsumerPools, oldest first."""
        with self._lock:
            alive = [ref() for ref in self._pools]
        return [pool for pool in alive if pool is not None and not pool.closed]

    def n_consumers(self) -> int:
        return sum(pool.n_consumers for pool in self.pools())

    def consumers_changed(self) -> None:
        """A ConsumerPool was made or closed: every driver cuts single tasks for the new count."""
        n = self.n_consumers()
        for driver in self.drivers():
            driver.consumers = n

    def any_running(self) -> bool:
        return any(pool.running for pool in self.pools())

    def held_up(self) -> dict[int, tuple[type[Exception], str]]:
        """The queues (by index) whose tasks no running ConsumerPool will take as things stand,
        each with the error to raise and why (the first running pool's): every running pool says
        it does not serve the queue now (``held_up()``: placed again where its consumers cannot
        reach it, or served only by consumers whose class cannot be made). Queues placed
        unreachably come first. A pool without ``held_up()`` counts as serving every queue; with no
        running pool nothing is held up here (:meth:`stranded` and ``join()`` say that)."""
        running = [pool for pool in self.pools() if pool.running]
        found: list[dict[int, tuple[type[Exception], str]]] = [getattr(pool, "held_up", dict)() for pool in running]
        if not found or not found[0]:
            return {}
        common = set(found[0]).intersection(*found[1:])
        first = found[0]
        order = sorted(common, key=lambda q: (first[q][0] is not BrokerUnreachable, q))
        return {q: first[q] for q in order}

    def still_held_up(self, broker: int) -> bool:
        """Whether queue ``broker`` of :meth:`held_up` still is held up by every running pool,
        each asked again now (a pool without ``still_held_up()`` says yes): what join() and
        result() confirm before they raise."""
        running = [pool for pool in self.pools() if pool.running]
        return bool(running) and all(getattr(pool, "still_held_up", lambda b: True)(broker) for pool in running)

    def stranded(self) -> str:
        """Why nothing consumes although ConsumerPools were started: every running pool has had no
        consumer placed for its bound (each says why, naming its constraint); ``""`` otherwise.
        A listener that cannot tell (one without ``stranded()``) counts as consuming."""
        running = [pool for pool in self.pools() if pool.running]
        reasons = [getattr(pool, "stranded", lambda: "")() for pool in running]
        return "; ".join(reasons) if running and all(reasons) else ""

    def add_identity(self, identity: bytes) -> None:
        with self._lock:
            self._identities.add(identity)

    def identities(self) -> frozenset[bytes]:
        with self._lock:
            return frozenset(self._identities)

    def broker_moved(self, broker: int, endpoint: str, queue: str) -> None:
        """Tell every ConsumerPool that queue ``broker`` is served at ``endpoint`` now; one
        pool's failure never keeps the others uninformed."""
        for pool in self.pools():
            try:
                pool.on_broker_moved(broker, endpoint)
            except Exception as e:  # noqa: BLE001 - logged, the others are told
                logger.warning("telling %s that queue %s moved failed: %s", type(pool).__name__, queue, e)

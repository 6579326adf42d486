"""The watch over a QueuePool's queues and relay, on its supervisor thread.

Each round: a relay to replace, an attached pool following its owner, brokers cancelled by ``client.restart()``, and
the placed brokers' own round (lost ones placed again: :class:`~zdq.client.brokers.PlacedQueues`).
The pool's Dask client closed under it ends the supervision by the supervisor's own rule, the same
for both pools (:class:`~zdq.client.slots.Supervisor`), which calls :meth:`QueueWatch.client_closed`:
the futures fail, saying so.
It holds no reference to its pool (the supervisor thread holds the watch weakly, the pool holds
the watch): a pool dropped without close() is still freed at once.

Ownership
---------
=====================  ============================================================================
state                  owner
=====================  ============================================================================
``reset_by_restart``   the supervisor thread (set once); read by reprs
``_io_stalled``,       the supervisor thread
``_watched_at``,
``_watching_since``
``_supervisor``        the user's thread (``start``/``stop``)
=====================  ============================================================================
"""

from __future__ import annotations

import logging
import math
import time
import weakref

from distributed import Client

from zdq.client.brokers import AttachedQueues, PlacedQueues
from zdq.client.consumer_registry import ConsumerRegistry
from zdq.client.slots import Supervisor
from zdq.client.driver import Driver
from zdq.errors import BrokerLost, ClosedError
from zdq.names import counted
from zdq.relay.path import RelayPath

__all__ = ["QueueWatch"]

logger = logging.getLogger(__name__)

#: A look at the driver's I/O thread this long (or a heartbeat timeout, if less) after the one
#: before means the supervisor thread did not run either (its rounds come every second or less).
_OWN_GAP = 5.0


class QueueWatch:
    """Supervision of one pool's queues (and relay), a round at a time."""

    def __init__(
        self,
        client: Client,
        name: str,
        dirpath: str | None,
        queues: PlacedQueues | AttachedQueues,
        driver: Driver,
        relay: RelayPath | None,
        consumers: ConsumerRegistry,
    ) -> None:
        self.client = client
        self.name = name
        self.dirpath = dirpath
        self.queues = queues
        self.driver = driver
        self.relay = relay
        # Weakly: the pool's finalizer holds this watch (to stop it), and the registry holds the
        # started ConsumerPools, which hold the pool: a strong reference would keep them all alive.
        self._consumers = weakref.ref(consumers)
        self.reset_by_restart = False
        self._supervisor: Supervisor | None = None
        self._io_stalled = False
        self._watched_at = time.monotonic()  # this thread's last look at the I/O thread
        self._watching_since = -math.inf  # the I/O thread's stall counts from here at the earliest

    def start(self, interval: float) -> None:
        self._supervisor = Supervisor(
            self, "zdq-supervisor-queues", interval, client=self.client, method="round", on_client_closed="client_closed"
        )
        self._supervisor.start()

    def stop(self, join: float = 0.0) -> None:
        if self._supervisor is not None:
            self._supervisor.stop(join=join)

    def stopping(self) -> bool:
        return self._supervisor is None or self._supervisor.stopping

    def _moved(self, i: int, endpoint: str) -> None:
        consumers = self._consumers()
        if consumers is not None:
            consumers.broker_moved(i, endpoint, self.queues.queue_names[i])

    def _kept(self) -> str:
        return " (a durable queue kept them: a new pool on the same dirpath runs them)" if self.dirpath else ""

    def client_closed(self) -> None:
        """The pool's Dask client was closed under it (or its cluster with it), the pool open: no
        queue can be placed again, and nothing its futures wait for is sure to come. They fail
        now, saying so, instead of waiting for ever; the supervision ends (the supervisor's rule,
        the same for the consumers': :class:`~zdq.client.slots.Supervisor`)."""
        if self.relay is not None:
            self.relay.close()
        failed = self.driver.fail_all(
            ClosedError(
                f"the Dask client of pool {self.name} was closed (or its cluster, or it lost the scheduler for good) "
                f"while this task was pending{self._kept()}: close pools before their client"
            )
        )
        if failed:
            logger.error(
                "the Dask client of pool %s was closed while the pool was open: its %s failed%s",
                self.name,
                counted(failed, "pending task"),
                self._kept(),
            )
        else:
            # What a daskqueue program does at its end (it never closes its pools): nothing lost.
            logger.info("the Dask client of pool %s was closed while the pool was open (no task was pending)", self.name)

    def round(self) -> None:
        if self.stopping():
            return
        driver, queues = self.driver, self.queues
        self._watch_io(driver)
        if self.relay is not None and self.relay.needs_replacing():
            self._replace_relay()
        relay_down = self.relay is not None and self.relay.needs_replacing()
        if isinstance(queues, AttachedQueues):
            if not queues.follow(driver, self._moved):
                logger.warning("pool %s was closed by its owner: the tasks this producer still waits for fail", self.name)
                self.stop()
                driver.fail_all(ClosedError(f"pool {self.name} was closed by the process that placed it"))
            return
        if queues.cancelled():
            # client.restart() (or a cancel) took the actors: the cluster was reset on purpose, and a
            # new pool may reopen the same queues. Recovering here would race it for the directories;
            # what this pool's futures wait for will not come, so they fail now.
            logger.warning(
                "the brokers of pool %s were cancelled (client.restart(), or the scheduler dropped this client "
                "after losing touch with it): its pending tasks fail",
                self.name,
            )
            self.stop()
            self.reset_by_restart = True
            queues.withdraw()  # a new pool on the same name must not attach to these dead queues
            driver.fail_all(
                BrokerLost(
                    f"the brokers of pool {self.name} were cancelled while this task was pending: the cluster "
                    "was restarted (client.restart()), or the scheduler dropped this client (a network cut "
                    f"longer than Dask's timeouts releases the client's actors){self._kept()}; make a new QueuePool"
                )
            )
            return
        queues.supervise_once(driver, self._moved, self.stopping, relay_down)

    def _watch_io(self, driver: Driver) -> None:
        """Say so, with where it is, when the driver's I/O thread stops coming round its loop
        (nothing of the pool moves without it: a zdq bug, or this process starved), and again when
        it comes back; once each."""
        now = time.monotonic()
        if now - self._watched_at > min(_OWN_GAP, driver.heartbeat_timeout):
            # This thread did not run either: the whole process was stopped (SIGSTOP, a laptop's
            # sleep) or starved. The I/O thread is given its own time from now before it is said
            # to be stuck (reviewer 23 saw "a zdq bug" blamed after a 32 s SIGSTOP).
            self._watching_since = now
        self._watched_at = now
        stall = driver.io_stall(since=self._watching_since)
        if stall is not None and not self._io_stalled:
            seconds, where = stall
            logger.error(
                "the driver's I/O thread of pool %s has not come round its loop for %.0f s: every task and result "
                "of the pool waits for it (a zdq bug, or this process starved of CPU). Where it is:\n%s",
                self.name,
                seconds,
                where,
            )
        elif stall is None and self._io_stalled:
            logger.warning("the driver's I/O thread of pool %s comes round its loop again", self.name)
        self._io_stalled = stall is not None

    def _replace_relay(self) -> None:
        """The relay failed: place another and carry every link through it. Each broker is asked
        which of the chunks it never confirmed it holds (the others are sent again), and sends
        again the results it sent on the old path; a broker silent meanwhile fails nothing."""
        assert self.relay is not None
        queues = self.queues

        def meanwhile() -> None:  # a relay placed on a stopped worker must not hold back lost queues
            if isinstance(queues, PlacedQueues):
                queues.note_losses(self.driver, self.stopping, relay_down=True)

        if not self.relay.replace(avoid=queues.workers(), meanwhile=meanwhile):
            return
        down = queues.down() if isinstance(queues, PlacedQueues) else set()
        for i in range(queues.n_queues):
            if i not in down:
                self.driver.reroute(i)

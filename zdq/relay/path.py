"""A pool's relay: the Relay actor placed on a worker, the tunnel to it, and its replacement.

:class:`RelayPath` is what a :class:`~zdq.QueuePool` made with ``relay=True`` holds: it places the
actor, starts the :class:`~zdq.relay.tunnel.Tunnel` the driver connects through, and, when the
relay fails (its worker died, an actor call timed out), places another; the pool then reconnects
every link of its driver through it (the driver's protocol resends what the brokers never
confirmed and asks them which chunks they hold).

Placing a relay includes agreeing its keys: the path's own ephemeral X25519 key pair, the relay's
answer to ``hello``, and the session that encrypts every batch between them
(:mod:`zdq.relay.cipher`). A relay that does not answer ``hello`` is not placed.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from zdq._actor import candidate_workers, scheduler_workers
from zdq.client.slots import release_future, result_in_steps
from zdq.errors import PlacementError
from zdq.relay.actor import Relay
from zdq.relay.cipher import KeyOffer, RelaySession, Side
from zdq.relay.tunnel import Tunnel
from zdq.transport.security import ClientKeys

__all__ = ["RelayPath"]

logger = logging.getLogger(__name__)


class RelayPath:
    """The relay of one driver.

    Parameters
    ----------
    client : distributed.Client
        The pool's client.
    name : str
        The pool's name.
    identity : bytes
        The driver's routing identity.
    keys : ClientKeys, optional
        The pool's CURVE client keys.
    max_message_size : int
        The largest message a broker sends.
    call_timeout : float
        How long one call to the relay may take before it counts as lost.
    workers : list of str, optional
        Where the relay may be placed (the pool's ``workers=``).
    """

    def __init__(
        self,
        client: Any,
        name: str,
        identity: bytes,
        keys: ClientKeys | None,
        max_message_size: int,
        call_timeout: float,
        workers: list[str] | None = None,
    ) -> None:
        self.client = client
        self.name = name
        self._identity = identity
        self._keys = keys
        self._max = max_message_size
        self._workers = workers
        self._placed_on: dict[int, str] = {}
        self._future: Any = None
        self._actor: Any = None
        self._failed = threading.Event()
        self.tunnel = Tunnel(name, identity, call_timeout, lambda exc: self._failed.set())
        self.replacements = 0

    @property
    def worker(self) -> str:
        return self._placed_on.get(0, "")

    def start(self, avoid: Sequence[str] = ()) -> None:
        """Place the relay and start the tunnel (before the driver connects through it).
        ``avoid``: workers to leave alone if others can take it (the brokers': a worker lost
        then takes one path, not both the queue and the way to it)."""
        self._future, self._actor, session = self._place(avoid)
        self.tunnel.start(self._actor, self.worker, session)

    def _place(
        self, avoid: Sequence[str], timeout: float = 60.0, meanwhile: Callable[[], object] = lambda: None
    ) -> tuple[Any, Any, RelaySession]:
        """Place a relay and agree its keys: never on its last worker (it failed there) while
        another can take it, and on none of ``avoid`` while another can. ``meanwhile()`` runs
        between steps of the waits (:func:`~zdq.client.slots.result_in_steps`)."""
        known = scheduler_workers(self.client)
        candidates = candidate_workers(self.client, self._workers, None, known)
        last = self._placed_on.get(0)
        fresh = [a for a in candidates if a != last] or candidates
        free = [a for a in fresh if a not in set(avoid)] or fresh
        if not free:
            raise PlacementError(f"no worker is available to place the relay of pool {self.name} on")
        address = free[self.replacements % len(free)]
        self._placed_on[0] = address
        fut = self.client.submit(
            Relay,
            self.name,
            self._identity,
            self._keys,
            self._max,
            actor=True,
            workers=[address],
            allow_other_workers=False,
            pure=False,
            key=f"zdq-relay-{self.name}-{uuid.uuid4().hex[:8]}",
        )
        deadline = time.monotonic() + timeout  # placing and agreeing keys share it
        actor = None
        try:
            actor = result_in_steps(fut, timeout, meanwhile)
            return fut, actor, self._agree(actor, max(0.1, deadline - time.monotonic()), meanwhile)
        except Exception as e:
            release_future(fut, actor)  # the handle lives on in this error's traceback
            raise PlacementError(f"could not place the relay of pool {self.name} on {address}: {e}") from e

    def _agree(self, actor: Any, timeout: float, meanwhile: Callable[[], object]) -> RelaySession:
        """The session of this driver with the new relay ``actor``: only public keys cross Dask's comm."""
        offer = KeyOffer()
        relay_public = result_in_steps(actor.hello(offer.public), timeout, meanwhile)
        secret = self._keys.secret if self._keys is not None else None
        return offer.agree(relay_public, Side.DRIVER, pool=self.name, identity=self._identity, pool_secret=secret)

    def needs_replacing(self) -> bool:
        """Whether the relay failed: a call to it failed or timed out, or Dask lost its worker."""
        fut = self._future
        return self._failed.is_set() or (fut is not None and fut.status in ("error", "lost", "cancelled"))

    def replace(self, avoid: Sequence[str] = (), meanwhile: Callable[[], object] = lambda: None) -> bool:
        """Place a new relay (not on its last worker; on none of ``avoid`` if others can take
        it) and carry through it; False if it could not be placed (the supervisor's next round
        tries again). ``meanwhile()`` runs between steps of its waits: the supervisor that waits
        also tells the queues lost meanwhile."""
        old, old_actor = self._future, self._actor
        try:  # bounded by a call's timeout
            fut, actor, session = self._place(avoid, self.tunnel.call_timeout, meanwhile)
        except Exception as e:
            logger.warning("placing the relay of pool %s again failed (will retry): %s", self.name, e)
            return False
        self._failed.clear()
        self._future, self._actor = fut, actor
        self.tunnel.rebind(actor, self.worker, session)
        self.replacements += 1
        if old is not None:
            # The failed relay's handle outlives it in the traceback of the call that failed
            # (which a log handler may keep): its own future is released with the relay's.
            release_future(old, old_actor)
        logger.warning("the relay of pool %s was placed again, on %s", self.name, self.worker)
        return True

    def close(self) -> None:
        self.tunnel.close()
        if self._actor is not None:
            try:
                self._actor.stop().result(timeout=10)
            except Exception as e:  # its worker may be gone
                logger.debug("stopping the relay of pool %s failed: %s", self.name, e)
        if self._future is not None:
            release_future(self._future, self._actor)
        self._future = self._actor = None

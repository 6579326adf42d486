"""The queues of a QueuePool: the brokers it placed (:class:`PlacedQueues`), or those of a live
pool it attached to (:class:`AttachedQueues`).

:class:`PlacedQueues` places one broker actor per queue, opens them, publishes the pool on the
cluster, places a lost broker again (a durable one on its host), and releases them. Its slots are
an :class:`~zdq.client.slots.ActorSlots`: a recovery that ends after ``close()`` releases what it
placed instead of writing into the closed pool. :class:`AttachedQueues` follows the owner's
record: queues placed again, and the owner's end.

Ownership
---------
=================================  ================================================================
state                              owner
=================================  ================================================================
``PlacedQueues.slots``             its own lock (:class:`~zdq.client.slots.ActorSlots`)
``endpoints``, ``placed_on``,      the user's thread until ``place()`` returns, then the pool's
``where``                          supervisor thread (recovery); other threads read whole values
                                   (a list item, a dict item), never a half-written one
``_withdrawn``                     ``_record_lock`` (publish and withdraw never cross)
``_lost_since``, ``_gone``,        the pool's supervisor thread
``_silent_logged``, ``recoveries``,
``_probes``
``AttachedQueues.record``          the pool's supervisor thread (``follow``), after ``__init__``
``LockedWait``                     the user's thread, in ``QueuePool.start`` (one per start)
=================================  ================================================================

Reopening a durable pool whose directories are locked
-----------------------------------------------------
A program started again after a crash finds its queues' directories locked by the brokers of its
dead driver for a moment: Dask releases their actors once the scheduler sees the client gone, and
each broker lets go at its next heartbeat. :class:`LockedWait` is ``QueuePool.start``'s wait
meanwhile: it looks up the registry (a live owner: attach), asks the workers who holds the locks
(:func:`lock_holders`; free: place again at once), says once what it waits for, and raises
:class:`~zdq.errors.QueueLocked` naming the holders after :data:`LOCKED_WAIT` (issue 23, point 3).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from distributed import Client

from zdq._actor import NO_WORKER, candidate_workers, note_unanswered, scheduler_workers
from zdq.broker import Broker
from zdq.client import registry
from zdq.client.slots import (
    ActorSlots,
    NoAnswer,
    SlotsClosed,
    gather_actors,
    place_actor,
    placed_reports,
    release_future,
    result_in_steps,
    stop_created,
    wait_created,
)
from zdq.config import PoolSettings
from zdq.client.driver import Driver
from zdq.errors import BrokerLost, ClosedError, PlacementError, QueueLocked, QueueMissing, StorageCorrupt, ZdqError
from zdq.names import counted, pool_of_queue
from zdq.stats import BrokerStats
from zdq.transport.addresses import host_of
from zdq.transport.security import ClientKeys, PoolKeys

__all__ = ["PlacedQueues", "AttachedQueues", "LockedWait", "lock_holders", "make_keys", "LOCKED_WAIT"]

logger = logging.getLogger(__name__)

#: Told when a queue is served somewhere else: ``(queue index, endpoint)``.
Moved = Callable[[int, str], None]


def make_keys(client: Client, auth: bool, name: str) -> PoolKeys | None:
    if auth:
        return PoolKeys.generate()
    security = getattr(client, "security", None)
    if security is not None and getattr(security, "require_encryption", False):
        raise ZdqError("this Dask cluster is secured with TLS: zdq will not run its sockets unauthenticated (auth=False)")
    logger.warning(
        "zdq pool %s runs WITHOUT authentication (auth=False): anyone who can reach its brokers' "
        "ports can submit tasks, which means running code on your workers, and send forged results, which "
        "this process unpickles (running code here too). Use this on trusted networks only.",
        name,
    )
    return None


#: How long ``QueuePool.start`` waits for durable directories locked by brokers it cannot attach
#: to (a crashed driver's let go within a heartbeat of Dask releasing them) before QueueLocked.
LOCKED_WAIT = 30.0
#: While locked: the holders are asked this often, and placing is tried at least this often
#: (a holder the workers cannot see, on a host of no worker, is only found gone by placing).
_PROBE_EVERY = 0.5
_PLACE_EVERY = 2.0
#: A worker that does not answer within this (paused, or holding the GIL) leaves the holders unknown.
_PROBE_TIMEOUT = 5.0
#: A lost queue's placement is tried for a quarter of the recovery bound at a time, at least this
#: long (and at most ``placement-timeout``): a stopped worker then costs one try, not the bound.
_RECOVERY_TRY = 10.0
#: A queue whose broker's loop failed this many times within this many seconds is given up (see
#: ``PlacedQueues._recover``).
_LOOP_FAILURES, _LOOP_FAILURE_WINDOW = 3, 600.0
#: A question to a silent broker unanswered for this many heartbeat timeouts is asked again.
_PROBE_GIVEN_UP = 10
#: How long a recovery waits for a broker it gives up on (placed, not adopted) to stop.
_STOP_WAIT = 10.0


def _answered(call: Any, bound: float, worker: str, what: str, meanwhile: Callable[[], object]) -> Any:
    """The result of a recovery step's ``call`` (a Dask or actor future) within ``bound``; past
    it, ``worker`` is passed over from then on (:func:`~zdq._actor.note_unanswered`) and a
    PlacementError says the next round tries another. ``meanwhile()`` runs between steps of the
    wait (:func:`~zdq.client.slots.result_in_steps`): it tells the queues lost since the round
    began, which a stopped worker's bound must not hold back."""
    try:
        return result_in_steps(call, bound, meanwhile)
    except NoAnswer:
        note_unanswered(worker)
        raise PlacementError(
            f"its broker was not {what} within {bound:g} s on worker {worker} (stopped, or too busy): "
            "trying another worker"
        ) from None


def _holder_here(queue_dir: str, worker: Any) -> str:
    """Who holds ``queue_dir``'s lock, seen from ``worker``: one of its brokers, or another process."""
    from zdq.observe.feed import local_broker

    address = getattr(worker, "address", "?")
    actors = getattr(getattr(worker, "state", None), "actors", {})
    broker = local_broker(os.path.basename(os.path.normpath(queue_dir)))
    if broker is None or os.path.normpath(str(getattr(broker, "_dirpath", ""))) != os.path.normpath(queue_dir):
        return f"a process on the host of worker {address} that is not one of its brokers"
    pool = pool_of_queue(broker.name)
    if any(actor is broker for actor in actors.values()):
        return f"a live broker of pool {pool} on worker {address}"
    return f"a broker of pool {pool} on worker {address} whose actor was released (it lets go at its next heartbeat)"


def probe_locks(queue_dirs: list[str], dask_worker: Any = None) -> dict[str, str]:
    """Run on a worker: which of ``queue_dirs`` are locked, seen from its host, and by whom
    (``{directory: holder}``; a free or absent directory is left out). The lock is tried and
    let go at once (flock: closing this descriptor never drops a lock its process holds on another)."""
    from zdq.storage.lmdb import _LOCK

    held: dict[str, str] = {}
    for queue_dir in queue_dirs:
        try:
            fd = os.open(os.path.join(queue_dir, _LOCK), os.O_RDWR)
        except FileNotFoundError:
            continue
        except OSError as e:
            held[queue_dir] = f"unknown (its lock cannot be read from this worker: {e})"
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            held[queue_dir] = _holder_here(queue_dir, dask_worker)
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    return held


def lock_holders(client: Client, queue_dirs: list[str], workers: list[str] | None = None) -> dict[str, str] | None:
    """The locked directories of ``queue_dirs`` and their holders, asked of ``workers`` (default
    all): ``{}`` when every one is free, ``None`` when the workers could not be asked."""
    try:
        seen = client.run(probe_locks, queue_dirs, workers=workers, on_error="return", callback_timeout=_PROBE_TIMEOUT)
    except Exception as e:  # noqa: BLE001 - the caller places again on its own schedule
        logger.debug("could not ask the workers who holds %s: %s", queue_dirs, e)
        return None
    held: dict[str, str] = {}
    for answer in seen.values():
        if not isinstance(answer, dict):
            continue  # that worker could not tell
        for queue_dir, holder in answer.items():
            # Several workers share a host: the one whose broker holds it says more than the others.
            if queue_dir not in held or "broker of pool" in holder:
                held[queue_dir] = holder
    if not held and not any(isinstance(answer, dict) for answer in seen.values()):
        return None
    return held


class LockedWait:
    """``QueuePool.start``'s wait for the locked directories of a durable pool: when to place
    again, when to ask who holds them, what it says once, and the error at the bound.

    Pure bookkeeping over a clock: the pool asks the registry and the workers, and places.
    """

    def __init__(self, name: str, queue_names: list[str], bound: float | None = None, now: float = 0.0) -> None:
        self.name = name
        self.queue_names = queue_names
        self.bound = LOCKED_WAIT if bound is None else bound
        self.deadline = now + self.bound
        self.place_at = now  # the first placement is at once
        self.probe_at = now
        self.holders: dict[str, str] = {}
        self._error: QueueLocked | None = None
        self._told = False

    @property
    def waiting(self) -> bool:
        """Whether a placement found a directory locked."""
        return self._error is not None

    def may_place(self, now: float) -> bool:
        return now >= self.place_at

    def may_probe(self, now: float) -> bool:
        return self.waiting and now >= self.probe_at

    def locked(self, error: QueueLocked, holders: dict[str, str] | None, now: float) -> str | None:
        """A placement raised ``error``. Raises QueueLocked past the bound; else returns what to
        say (the first time only: a wait is told once), and places again within ``_PLACE_EVERY``."""
        self._error = error
        if holders:
            self.holders = dict(holders)
        if now >= self.deadline:
            raise QueueLocked(self._gave_up()) from error
        self.place_at = now + _PLACE_EVERY
        self.probe_at = now + _PROBE_EVERY
        if self._told:
            return None
        self._told = True
        return (
            f"pool {self.name}: {self._held()}; waiting up to {self.bound:g} s for it to be released or for "
            "its owner to register the pool (then this one attaches to it)"
        )

    def probed(self, holders: dict[str, str] | None, now: float) -> None:
        """The workers were asked: every directory free places again at once (``None``: unknown)."""
        self.probe_at = now + _PROBE_EVERY
        if holders is None:
            return
        if not holders:
            self.place_at = now
        else:
            self.holders = dict(holders)

    def _held(self) -> str:
        if not self.holders:
            return f"a queue directory is locked by a broker this cluster's workers do not see ({self._error})"
        return "; ".join(
            f"queue {os.path.basename(os.path.normpath(d))}'s directory {d} is locked by {who}"
            for d, who in sorted(self.holders.items())
        )

    def _gave_up(self) -> str:
        return (
            f"pool {self.name} could not be opened within {self.bound:g} s: {self._held()}. It waited for the "
            "lock to be released (a crashed driver's brokers let go within a heartbeat once Dask sees their "
            "client gone) and for a live owner to register the pool, to attach to it: neither came. Close the "
            "pool that holds the directory, or open this one with another dirpath"
        )


class PlacedQueues:
    """The brokers a pool placed: one actor per queue, placed, opened, recovered, released."""

    def __init__(
        self,
        client: Client,
        name: str,
        queue_names: list[str],
        settings: PoolSettings,
        *,
        dirpath: str | None,
        durable: bool,
        keys: PoolKeys | None,
        allowed_workers: list[str] | None,
        resources: dict[str, float] | None,
        identity: bytes,
        owner_token: bytes,
    ) -> None:
        self.client = client
        self.name = name
        self.queue_names = queue_names
        self.n_queues = len(queue_names)
        self.settings = settings
        self.dirpath = dirpath
        self.durable = durable
        self.keys = keys
        self._allowed = allowed_workers
        self._resources = resources
        self._identity = identity
        self._owner_token = owner_token
        self.slots: ActorSlots[Any] = ActorSlots(self.n_queues)
        self.endpoints: list[str] = []
        self.payload_key: bytes | None = None
        self.placed_on: dict[int, str] = {}
        self.where: list[tuple[str, str]] = []  # (host, queue id) of each queue
        self._lost_since: dict[int, float] = {}  # queues lost and not yet placed again
        self._gone: set[int] = set()  # durable queues that cannot be placed again
        self._silent_logged: set[int] = set()
        #: A silent queue's broker asked whether its loop ended: (its answer to come, when asked).
        self._probes: dict[int, tuple[Any, float]] = {}
        #: When each queue's broker loop failed lately (a queue whose every broker fails so, a
        #: bug its stored state sets off each time, is given up after :data:`_LOOP_FAILURES`
        #: within :data:`_LOOP_FAILURE_WINDOW`).
        self._loop_failures: dict[int, list[float]] = {}
        self.recoveries = 0
        #: Each queue's own rate limit as this pool last set it: a transient queue placed again
        #: gets it back (a durable one finds its own, stored with it).
        self.rate_limits: dict[int, float | None] = {}
        # Publishing (the supervisor, after a recovery) and withdrawing (close()) never cross: a
        # late recovery does not publish a pool that was withdrawn.
        self._record_lock = threading.Lock()
        self._withdrawn = False
        # How long a lost queue may take to be placed again (a nanny restarting its worker takes
        # seconds) before what it held fails: every future settles within a bound.
        self.recovery_timeout = max(60.0, 4 * settings.heartbeat_timeout)

    @property
    def client_keys(self) -> ClientKeys | None:
        return None if self.keys is None else self.keys.client

    def workers(self) -> list[str]:
        return [self.placed_on.get(i, "") for i in range(self.n_queues)]

    def queue_dir(self, i: int) -> str | None:
        return None if self.dirpath is None else os.path.join(self.dirpath, self.queue_names[i])

    def broker(self, i: int) -> Any:
        """The broker actor of queue ``i`` as placed now."""
        actor = None if self.slots.closed else self.slots.actor(i)
        if actor is None:
            raise ClosedError(f"queue pool {self.name} has no brokers: it is not started, or closed")
        return actor

    def down(self) -> set[int]:
        """Queues lost and not placed again (yet, or ever)."""
        return set(self._lost_since) | self._gone

    # -- placing ---------------------------------------------------------------------------------
    def place(self, auth: bool, timeout: float | None = None) -> None:
        """Place and open every broker at once (placing a pool costs about the same per queue
        whatever its size), waiting for the actors at most ``timeout`` seconds (default
        ``placement-timeout``)."""
        timeout = self.settings.placement_timeout if timeout is None else timeout
        futures: list[Any] = []
        brokers: list[Any] = []
        try:
            known = scheduler_workers(self.client)  # asked once, not per queue
            # A durable queue keeps the payload key of the pool that created it, so that a pool
            # reopened after a restart reads what was stored; the queues of one dirpath agree on it.
            proposed = os.urandom(32) if auth else None
            opening = (self._identity, proposed, self.n_queues)  # each opens in its constructor
            futures = [self._submit(i, known=known, open_with=opening) for i in range(self.n_queues)]
            labelled = [(f"queue {i}", fut, self.placed_on.get(i, "?")) for i, fut in enumerate(futures)]
            wait_created(self.client, labelled, timeout, known, "queue")
            brokers = gather_actors(self.client, futures, timeout)  # one round trip
            for i, (fut, broker) in enumerate(zip(futures, brokers)):
                self.slots.adopt(i, fut, broker)
            opened = self._opened(futures, brokers, opening)
            self.endpoints = [endpoint for endpoint, _, _, _, _ in opened]
            # A queue's host is its worker's as the scheduler names it, the name recovery places
            # by (the broker's own view may be another name of the same machine).
            self.where = [(host_of(self.placed_on[i]), str(queue_id)) for i, (_, _, queue_id, _, _) in enumerate(opened)]
            beyond = sorted({d for _, _, _, _, dirs in opened for d in dirs})
            if beyond:
                logger.warning(
                    "durable pool %s was opened with %s, but its directory also holds queues beyond "
                    "them, which this pool does not serve (their tasks and schedules wait there): %s; open it "
                    "with as many queues to serve them",
                    self.name, counted(self.n_queues, "queue"), ", ".join(beyond),
                )
            self.payload_key = self._agreed_key(brokers, [key for _, _, _, key, _ in opened], proposed)
        except ZdqError:
            self._release(futures, brokers)
            raise
        except Exception as e:
            self._release(futures, brokers)
            raise PlacementError(f"could not place the queues of pool {self.name}: {e}") from e
        except BaseException:  # an interrupt: nothing of this placement serves on unseen
            self._release(futures, brokers)
            raise

    def _agreed_key(self, brokers: list[Any], keys: list[bytes | None], proposed: bytes | None) -> bytes | None:
        """The pool's payload key, from each queue's ``keys`` as opened. The queues of one dirpath
        agree on it, but a pool opened with more queues than before opens its new ones with the key
        ``proposed``: the pool's key is then the one its queues that hold something were sealed
        with, and every queue that holds nothing takes it (:meth:`~zdq.broker.Broker.join_key`).
        Queues holding what different keys sealed were written by different pools: refused."""
        if len(set(keys)) == 1:
            return keys[0]
        timeout = self.settings.placement_timeout
        asked = [broker.holds_nothing() for broker in brokers]
        holding = {i: key for i, (key, call) in enumerate(zip(keys, asked)) if not call.result(timeout=timeout)}
        sealed = {key for key in holding.values() if key is not None}  # a queue with no key stored takes any
        if len(sealed) > 1:
            groups = sorted(
                ", ".join(self.queue_names[i] for i, k in holding.items() if k == key) for key in sealed
            )
            raise StorageCorrupt(
                f"the queues under {self.dirpath} hold tasks written by different pools (their keys differ): "
                + "; ".join(f"{{{group}}}" for group in groups)
                + ". Each pool needs a dirpath of its own (or a name of its own)"
            )
        # None holding anything sealed: the key of the first queue that kept one (not a new queue's).
        key = sealed.pop() if sealed else next((k for k in keys if k not in (proposed, None)), proposed)
        assert key is not None  # keys differ, so some queue kept a key
        joining = [(i, brokers[i].join_key(key)) for i, k in enumerate(keys) if k != key]
        for i, call in joining:
            if call.result(timeout=timeout) != key:  # written meanwhile by another pool's driver
                raise StorageCorrupt(f"queue {self.queue_names[i]} under {self.dirpath} holds tasks of another pool (its key differs)")
        logger.info(
            "durable pool %s: %s took the pool's key (queues added since it was last opened)",
            self.name, ", ".join(self.queue_names[i] for i, _ in joining),
        )
        return key

    def _opened(self, futures: list[Any], brokers: list[Any], opening: tuple[bytes, bytes | None, int]) -> list[Any]:
        """What each broker's :meth:`~zdq.broker.Broker.open` answered in its constructor
        ``(endpoint, host, queue id, payload key, beyond)``, read from the scheduler in one round
        trip; a broker whose report is not there, or whose key is not the one proposed (a durable
        queue keeps its own, never told there), is asked (its open is idempotent)."""
        timeout = self.settings.placement_timeout
        told = placed_reports(self.client, futures, timeout)
        proposed = opening[1]
        out: list[Any] = [None] * len(futures)
        asked = []
        for i, fut in enumerate(futures):
            what = told.get(str(fut.key))
            if what is not None and what[3]:
                endpoint, host, queue_id, _, beyond = what
                out[i] = (endpoint, host, queue_id, proposed, list(beyond))
            else:
                asked.append((i, brokers[i].open(*opening)))
        for i, call in asked:
            out[i] = call.result(timeout=timeout)
        return out

    def _release(self, futures: list[Any], proxies: list[Any]) -> None:
        """Undo a failed placement: every broker created stops (opened in their constructors,
        adopted or not), and a queue directory one created and wrote nothing to is removed, so
        that a failed open leaves nothing behind (an empty queue-1 of a pool that failed to grow
        made every later open with one queue warn of it). ``proxies``: the actor proxies gathered,
        each holding its actor's key (see :func:`~zdq.client.slots.release_future`)."""
        stop_created(self.client, futures, "broker", stop=lambda broker: broker.stop(discard=True))
        self.release()
        for fut in futures:
            release_future(fut)
        for proxy in proxies:
            release_future(None, proxy)

    def _submit(
        self,
        i: int,
        *,
        host: str | None = None,
        known: dict[str, Any] | None = None,
        open_with: tuple[bytes, bytes | None, int] | None = None,
    ) -> Any:
        """Place the broker of queue ``i``; ``host``: only on a worker of that host (recovery of a
        durable queue, whose directory is on that host's disk), and never creating a new queue;
        ``open_with``: it opens in its constructor (see :class:`~zdq.broker.Broker`)."""
        allowed = self._allowed
        if host is not None:
            here = [a for a in candidate_workers(self.client, allowed, self._resources) if host_of(a) == host]
            if not here:
                raise PlacementError(
                    f"durable queue {self.queue_names[i]} lives in {self.queue_dir(i)} on host {host}, "
                    "and no worker of that host is available to serve it"
                )
            allowed = here
        try:
            return place_actor(
                self.client,
                Broker,
                (self.queue_names[i], self.settings, self.queue_dir(i), None if self.keys is None else self.keys.server,
                 host is not None, open_with),
                slot=i, allowed=allowed, placed_on=self.placed_on, resources=self._resources,
                key=f"zdq-broker-{self.queue_names[i]}", known=known,
            )
        except PlacementError as e:
            if host is None or not str(e).startswith(NO_WORKER):
                raise
            # The candidates are zdq's own choice (the queue's host), not a workers= of the user's.
            raise PlacementError(
                f"durable queue {self.queue_names[i]} lives in {self.queue_dir(i)} on host {host}, and none of "
                f"that host's workers ({', '.join(allowed or [])}) is live to serve it now"
            ) from e

    # -- the registry ----------------------------------------------------------------------------
    def publish(self) -> None:
        """Tell the cluster where this pool's queues are (other producers attach by name)."""
        with self._record_lock:
            if not self._withdrawn:
                self._publish()

    def _publish(self) -> None:
        try:
            registry.publish(
                self.client,
                registry.PoolRecord(
                    name=self.name,
                    durable=self.durable,
                    dirpath=self.dirpath,
                    queue_names=tuple(self.queue_names),
                    endpoints=tuple(self.endpoints),
                    client_keys=self.client_keys,
                    payload_key=self.payload_key,
                    settings=self.settings,
                    owner_client=str(self.client.id),
                    owner_token=self._owner_token,
                    workers=tuple(self.workers()),
                    owner_process=registry.OwnerProcess.here(),
                ),
            )
        except Exception as e:  # the pool works without it; only attaching does not
            logger.warning("pool %s could not be published on the cluster: %s", self.name, e)

    def withdraw(self) -> None:
        with self._record_lock:
            if self._withdrawn:
                return
            self._withdrawn = True
            registry.withdraw(
                self.client,
                registry.PoolRecord(self.name, False, self.dirpath, (), (), None, None, self.settings, "", self._owner_token),
            )

    # -- supervision (the pool's supervisor thread) ------------------------------------------------
    def cancelled(self) -> bool:
        """Whether Dask cancelled the brokers (``client.restart()``)."""
        return any(fut is not None and fut.status == "cancelled" for fut in self.slots.futures())

    def supervise_once(
        self, driver: Driver, moved: Moved, stopping: Callable[[], bool], relay_down: bool = False
    ) -> None:
        # Every queue lost is told first (a transient one's tasks fail now; what it never confirmed
        # goes to the others): placing one again may wait out a try's bound on a stopped worker,
        # which must not hold back the news of the others (several workers die together). Dask
        # may see those others gone only during that wait: it looks again between its steps.
        lost = self.note_losses(driver, stopping, relay_down)
        for i in lost:
            if stopping():
                return
            self._recover(i, driver, moved, stopping, relay_down)

    def note_losses(self, driver: Driver, stopping: Callable[[], bool], relay_down: bool = False) -> list[int]:
        """Tell the driver of every queue whose worker Dask says is gone (once per loss; silence
        alone is only logged, and not while the pool's relay, the path to every broker, is being
        placed again: ``relay_down``); the queues lost, to place again."""
        lost = []
        for i, fut in enumerate(self.slots.futures()):
            if i in self._gone or stopping() or fut is None:
                continue
            if fut.status == "finished" and i not in self._lost_since:
                # Silence alone is not a loss: a task holding the GIL beside the broker, or a
                # paused worker, keeps it quiet. Dask says when its worker is really gone.
                if relay_down:
                    continue  # the path is down, not the broker (said by the relay's replacement)
                silence = driver.broker_silence(i)
                if silence > self.settings.heartbeat_timeout and self._loop_ended(i):
                    lost.append(i)  # its worker lives, but the broker in it serves no one
                    continue
                if silence > self.settings.heartbeat_timeout and i not in self._silent_logged:
                    self._silent_logged.add(i)
                    logger.warning(
                        "queue %s has been silent for %.0f s; Dask still counts its worker alive (busy, holding "
                        "the GIL, or stopped; or this process's network to it is cut)",
                        self.queue_names[i], silence,
                    )
                elif silence < self.settings.heartbeat_timeout:
                    self._silent_logged.discard(i)
                continue
            lost.append(i)
        for i in lost:
            self._note_lost(i, driver)
        return lost

    def _loop_ended(self, i: int) -> bool:
        """Whether the broker of silent queue ``i`` says its loop ended on an error (a bug of
        zdq's: its actor and its worker live on, and Dask would never call it lost). Asked
        without waiting, one question at a time, again a heartbeat timeout after a "no"; the
        answer is read a later round. A broker that does not answer (a worker stalled, stopped or
        cut off) is only silent."""
        now = time.monotonic()
        probe = self._probes.get(i)
        if probe is None or (not probe[0].done() and now - probe[1] > _PROBE_GIVEN_UP * self.settings.heartbeat_timeout):
            # One question at a time (a stopped worker answers it when it resumes); one lost on
            # the way is asked again, rarely.
            actor = self.slots.actor(i)
            if actor is not None:
                try:
                    self._probes[i] = (actor.loop_error(), now)
                except Exception as e:  # noqa: BLE001 - its worker is going: Dask will say so
                    logger.debug("asking the broker of queue %s about its loop failed: %s", self.queue_names[i], e)
            return False
        call, asked = probe
        if not call.done():
            return False
        try:
            why = call.result(timeout=5)  # done: it returns at once (a timeout of 0 may not)
        except Exception:  # noqa: BLE001 - no answer is not an answer: only silent
            why = ""
        if not why:
            if now - asked > self.settings.heartbeat_timeout:
                del self._probes[i]  # asked again next round, while it stays silent
            return False
        del self._probes[i]
        self._loop_failures[i] = [t for t in self._loop_failures.get(i, []) if now - t < _LOOP_FAILURE_WINDOW] + [now]
        logger.error("the broker of queue %s stopped serving (%s): placing it again", self.queue_names[i], why)
        return True

    def _note_lost(self, i: int, driver: Driver) -> None:
        """Queue ``i`` was lost with its worker: tell the driver (once per loss)."""
        if i in self._lost_since:
            return
        self._probes.pop(i, None)  # a question to the broker lost is not answered by the next one
        transient = not self.durable
        self._lost_since[i] = time.monotonic()
        driver.broker_lost(i, memory_lost=transient)
        logger.warning(
            "queue %s was lost with its worker%s; placing it again",
            self.queue_names[i],
            " (the tasks and schedules that lived only in its memory are gone: the tasks fail with BrokerLost)"
            if transient
            else "",
        )

    def _recover(self, i: int, driver: Driver, moved: Moved, stopping: Callable[[], bool], relay_down: bool) -> None:
        transient = not self.durable
        name = self.queue_names[i]
        self._note_lost(i, driver)
        failures = len(self._loop_failures.get(i, []))
        if failures >= _LOOP_FAILURES:
            # Placed again, its broker fails the same way each time (something its stored state
            # sets off): placing it once more would only fail again.
            return self._unrecoverable(
                i, ZdqError(f"its broker's loop failed {failures} times within {_LOOP_FAILURE_WINDOW:.0f} s (see the workers' logs)"), driver
            )
        host = None if transient else self.where[i][0]
        try:
            fut = self._submit(i, host=host)
        except Exception as e:  # the next round tries again, within the recovery bound
            if time.monotonic() - self._lost_since[i] > self.recovery_timeout:
                return self._unrecoverable(i, e, driver)
            logger.debug("placing queue %s again failed (will retry): %s", name, e)
            return None
        broker: Any = None
        # Each try is bounded by a share of the recovery bound: a worker that does not answer (stopped,
        # hung) costs one share, is passed over from then on, and the next round tries another.
        bound = min(self.settings.placement_timeout, max(_RECOVERY_TRY, self.recovery_timeout / 4))
        worker = self.placed_on.get(i, "")

        def meanwhile() -> None:
            self.note_losses(driver, stopping, relay_down)

        try:
            broker = _answered(fut, bound, worker, "created", meanwhile)
            if stopping():
                raise SlotsClosed(f"queue pool {self.name} closed while queue {name} was placed again")
            endpoint, _, id_found, key, _ = _answered(
                broker.open(self._identity, self.payload_key), bound, worker, "opened", meanwhile
            )
            where = (host_of(self.placed_on[i]), str(id_found))
            if not transient and where != self.where[i]:
                raise QueueMissing(
                    f"durable queue {name} placed again on host {where[0]} found queue id {where[1]} in "
                    f"{self.queue_dir(i)}, not {self.where[i][1]} on host {self.where[i][0]}: not the same queue"
                )
            if key != self.payload_key:
                raise StorageCorrupt(f"queue {name} was reopened with another pool's key")
            if transient and self.rate_limits.get(i):
                _answered(broker.set_rate_limit(self.rate_limits[i]), bound, worker, "given its rate limit", meanwhile)
            old = self.slots.adopt(i, fut, broker)
        except SlotsClosed as e:
            # close() ran meanwhile: what this late recovery placed is released, nothing written.
            logger.info("%s: released what it placed", e)
            self._stop_quietly(name, broker, meanwhile)
            release_future(fut, broker)
            return None
        except QueueMissing as e:
            self._stop_quietly(name, broker, meanwhile)
            release_future(fut)
            return self._unrecoverable(i, e, driver)
        except Exception as e:
            self._stop_quietly(name, broker, meanwhile)
            release_future(fut)
            if stopping():
                return None
            if time.monotonic() - self._lost_since[i] > self.recovery_timeout:
                return self._unrecoverable(i, e, driver)
            logger.warning("placing queue %s again failed (will retry): %s", name, e)
            return None
        release_future(old)
        if stopping():
            return None  # closed meanwhile: release() stops what was adopted; nothing is told
        self.endpoints[i] = endpoint
        del self._lost_since[i]
        driver.reconnect(i, endpoint, self.placed_on.get(i, ""))
        self.publish()
        self.recoveries += 1  # counted once its record names the new place
        logger.info("queue %s is served again at %s", name, endpoint)
        moved(i, endpoint)
        return None

    def _unrecoverable(self, i: int, error: Exception, driver: Driver) -> None:
        """A queue cannot be placed again (a durable one: not where its directory is): fail what
        it held; the other queues take what it never confirmed."""
        self._gone.add(i)
        since = self._lost_since.pop(i, None)
        name = self.queue_names[i]
        tried = f" after {time.monotonic() - since:.0f} s of tries" if since is not None else ""
        where = "" if not self.durable else f" (its tasks stay in {self.queue_dir(i)} on host {self.where[i][0]})"
        why = f"queue {name} cannot be served again{tried}{where}: {error}"
        logger.error("%s", why)
        driver.fail_chunks_of(i, BrokerLost(why))

    def gone(self) -> list[str]:
        """The queues given up for good (:meth:`_unrecoverable`), by name."""
        return [self.queue_names[i] for i in sorted(self._gone)]

    def _stop_quietly(self, name: str, broker: Any, meanwhile: Callable[[], object]) -> None:
        if broker is None:
            return
        try:
            result_in_steps(broker.stop(), _STOP_WAIT, meanwhile)
        except Exception as e:  # noqa: BLE001 - its worker may be gone already
            logger.debug("stopping the broker of queue %s failed: %s", name, e)

    # -- control plane -----------------------------------------------------------------------------
    def statistics(self, timeout: float) -> list[BrokerStats | BaseException]:
        """Every broker's statistics, asked in parallel; an exception where one did not answer."""
        calls: list[Any] = []
        for i in range(self.n_queues):
            try:
                calls.append(self.broker(i).statistics())
            except Exception as e:  # its worker is gone, or the pool closed
                calls.append(e)
        out: list[BrokerStats | BaseException] = []
        for call in calls:
            try:
                out.append(call if isinstance(call, BaseException) else call.result(timeout=timeout))
            except Exception as e:
                out.append(e)
        return out

    def release(self) -> None:
        """Stop every broker and release its actor (the slots refuse any late placement)."""
        self.slots.close(self.queue_names, "the broker of queue", 10, self.client, self.workers())


class AttachedQueues:
    """The queues of a live pool placed by another QueuePool: followed through its record."""

    def __init__(self, client: Client, record: registry.PoolRecord, dirpath: str | None) -> None:
        self.client = client
        self.record = record
        self.dirpath = dirpath
        self.name = record.name
        self.queue_names = list(record.queue_names)
        self.n_queues = len(record.queue_names)
        self.endpoints = list(record.endpoints)
        self.client_keys = record.client_keys
        self.payload_key = record.payload_key
        self.recoveries = 0

    def workers(self) -> list[str]:
        known = list(self.record.workers)
        return known + [""] * (self.n_queues - len(known))

    def follow(self, driver: Driver, moved: Moved) -> bool:
        """Follow the owner: queues placed again; False once the owner closed the pool."""
        try:
            record = registry.lookup(self.client, self.name, self.dirpath)
        except Exception as e:  # the scheduler is busy or going: try again next round
            logger.debug("attached pool %s could not read its record: %s", self.name, e)
            return True
        if record is None or record.owner_token != self.record.owner_token:
            return False
        for i, (old, new) in enumerate(zip(self.record.endpoints, record.endpoints)):
            if old != new:
                driver.broker_lost(i, memory_lost=not record.durable)
                driver.reconnect(i, new, record.workers[i] if i < len(record.workers) else "")
                self.endpoints[i] = new
                self.recoveries += 1
                moved(i, new)
        self.record = record
        return True

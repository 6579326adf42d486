"""The Consumer actor: the control plane of one consumer (start, stop, statistics, health).

Its methods run on the Dask worker's threads and only start, steer and stop what
:mod:`zdq.consumer.link` (the sockets) and :mod:`zdq.consumer.runner` (the chunks) do on zdq's own
threads; no task, result or acknowledgement ever passes through them.
"""

from __future__ import annotations

import asyncio
import os
import threading

import cloudpickle
import time
from typing import Any

from zdq._actor import (
    CURRENT_POOL,
    as_dask_task,
    liveness_probe,
    local_actors,
    pool_done,
    pool_in_use,
    worker_address,
)
from zdq.config import PoolSettings
from zdq.consumer.base import ConsumerArgs, ConsumerBaseClass, make_consumer
from zdq.consumer.link import Link
from zdq.consumer.runner import Counters, Runner
from zdq.errors import ConsumerInitError, PlacementError, travelling
from zdq.names import queue_name
from zdq.observe.feed import Source, add_source, remove_source
from zdq.codec.tasks import TaskOptions
from zdq.stats import ConsumerStats
from zdq.transport.security import ClientKeys

__all__ = ["REACHES_NONE", "Consumer"]

#: How :meth:`Consumer.health` says a consumer reached none of its queues (its pool's supervisor
#: replaces it, less and less often while its replacements reach none either).
REACHES_NONE = "reaches none of its queues"

#: After a stop's wait for the chunks running, how long its threads get to close the sockets.
_CLOSE_GRACE = 1.0
#: Once the sockets are closed, how long each thread gets to end (one running an abandoned task
#: runs on to the task's end: not waited for).
_THREAD_END = 0.5


class _Opened:
    """What the I/O thread sets once it opened its sockets (or failed to): runs ``then`` there
    first (see :meth:`Consumer._sockets_opened`), then tells whoever waits."""

    def __init__(self, then: Any) -> None:
        self._then = then
        self._event = threading.Event()

    def set(self) -> None:
        try:
            self._then()
        finally:
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


class Consumer:
    """Dask actor that pulls chunks from every broker of a pool and executes them.

    Parameters
    ----------
    name : str
        Display name (``GeneralConsumer-0``).
    identity : bytes
        16-byte routing identity, chosen by the pool so results can be attributed to it.
    consumer_class : type
        A :class:`ConsumerBaseClass` subclass, made here, in the constructor (as daskqueue made its
        consumer actors): one whose ``__init__`` raises fails the placement with a
        :class:`ConsumerInitError` naming it, this consumer and its worker.
    settings : PoolSettings
        Prefetch and heartbeat settings.
    max_concurrency : int
        Threads that run tasks; 1 runs each chunk in one tight loop (fastest for CPU-bound tasks).
    early_ack : bool
        Acknowledge a chunk when it is received (at most once) instead of after its results.
    retries : int
        Retries of tasks that carry no options of their own.
    keys : ClientKeys, optional
        The pool's CURVE client keys (``None``: unauthenticated sockets).
    payload_key : bytes, optional
        The key that seals chunks and results (``None``: unsealed).
    time_limit : float, optional
        Time limit of tasks that carry no options of their own.
    hard : bool
        Those tasks run in a child process killed at ``time_limit`` (see :mod:`zdq.consumer.hard`).
    pool : tuple, optional
        ``(name, dirpath)`` of the QueuePool it consumes: tasks reach it with
        :func:`zdq.current_pool`.
    start_with : tuple, optional
        ``(endpoints, queues)``: :meth:`start` with them in the constructor, so that a pool placed
        started (``ConsumerPool(..., start=True)``) costs one actor round trip per consumer less.
        A consumer that cannot start raises its :class:`PlacementError` (naming its worker) from
        the constructor: the placement fails with it.
    number : int
        The consumer's number in its pool, from 1: the ``id`` its class is given.
    batch_size : int, optional
        The ConsumerPool's ``batch_size``, given to its class.
    """

    def __init__(
        self,
        name: str,
        identity: bytes,
        consumer_class: type[ConsumerBaseClass],
        settings: PoolSettings,
        max_concurrency: int = 1,
        early_ack: bool = False,
        retries: int = 0,
        keys: ClientKeys | None = None,
        payload_key: bytes | None = None,
        time_limit: float | None = None,
        pool: tuple[str, str | None] | None = None,
        hard: bool = False,
        start_with: tuple[list[str], list[int]] | None = None,
        number: int = 1,
        batch_size: int | None = None,
    ) -> None:
        self.name = name
        self._pool = pool  # (name, dirpath) of its QueuePool: what zdq.current_pool() attaches to
        self._identity = identity
        self._class = consumer_class
        self._settings = settings
        self._max_concurrency = max_concurrency
        self._early_ack = early_ack
        self._defaults = TaskOptions(retries=retries, time_limit=time_limit, hard=hard)
        self._keys = keys
        self._payload_key = payload_key
        self._endpoints: list[str] = []
        self._queues: list[int] = []  # the pool's index of each queue in _endpoints
        self._worker = worker_address() or ""  # placed here: its statistics name it before start()
        self._stop = threading.Event()
        self._leave_by: float | None = None  # set by the first stop(): until when running chunks may end
        self._fetching = threading.Event()
        self._counters = Counters()
        self._link: Link | None = None
        self._runner: Runner | None = None
        self._io: threading.Thread | None = None
        self._exec: threading.Thread | None = None
        self._started = False  # start() succeeded and stop() was not called since: it should run
        self._start_error: str | None = None
        self._opened: _Opened | None = None  # set by the I/O thread once its sockets are open (or failed)
        self._opened_by = 0.0  # when reach() gives up waiting for that (placement-timeout after start)
        self._source: Source | None = None  # what the process's monitoring feed reports of it
        args = ConsumerArgs(number, name, pool[0] if pool else "", batch_size, max_concurrency, retries, early_ack)
        self._handler = self._make_handler(args)
        if start_with is not None:
            self._start_placed(*start_with)

    def _make_handler(self, args: ConsumerArgs) -> ConsumerBaseClass:
        """The user's consumer class, made with ``args``: what its ``__init__`` raises becomes a
        :class:`ConsumerInitError` naming it, this consumer and its worker (caused by it)."""
        try:
            return make_consumer(self._class, args)
        except Exception as e:
            failure = e
        # Raised outside the except: its cause goes as a task's error goes (itself if it unpickles,
        # else a RemoteTaskError naming it, its traceback in a note either way), and no context
        # goes with it. Dask pickles an error's cause and context on their own (tblib), past
        # ConsumerInitError.__reduce__: one that did not unpickle lost the whole error.
        here = worker_address() or "this process"
        raise ConsumerInitError(
            f"consumer class {self._class.__qualname__} raised {type(failure).__name__} in __init__ "
            f"(consumer {self.name} on {here}): {failure}"
        ) from travelling(failure)

    def _start_placed(self, endpoints: list[str], queues: list[int]) -> None:
        """:meth:`start`, in the constructor: any failure is a :class:`PlacementError` naming this
        consumer and its worker (the pool's placement fails with it)."""
        try:
            self.start(endpoints, queues)
        except PlacementError:
            raise
        except Exception as e:
            raise PlacementError(self._start_error or f"consumer {self.name} could not start: {e}") from e

    def start(self, endpoints: list[str], queues: list[int] | None = None) -> None:
        """Connect to the brokers at ``endpoints`` and start consuming. Idempotent; resumes a
        cancelled consumer. ``queues``: the pool's index of each of those queues (default: they
        are the pool's queues 0, 1, ...; a consumer serves at most ``fan-out`` of them).

        The sockets open in the background: a consumer that cannot open them (too many open files
        or sockets in its worker's process, an endpoint that does not parse) says so, naming itself
        and its worker, from :meth:`reach` (a :class:`PlacementError`) and :meth:`health`.

        Raises
        ------
        ValueError
            If ``queues`` and ``endpoints`` differ in length.
        """
        if self._io is not None and self._io.is_alive() and not self._stop.is_set():
            self._fetching.set()
            if self._link is not None:
                self._link.poke()  # it sleeps in poll until its next heartbeat otherwise
            return
        try:
            self._start_new(endpoints, queues)
        except Exception as e:
            # health() says so from now on: the pool's supervisor replaces a consumer that could not
            # start (a live actor that was never started would otherwise look healthy, and idle).
            self._start_error = (
                f"consumer {self.name} on {worker_address() or 'this process'} could not start: {type(e).__name__}: {e}"
            )
            raise

    def _start_new(self, endpoints: list[str], queues: list[int] | None) -> None:
        """:meth:`start`'s work when its threads are not running: make them, and the sockets."""
        handler = self._handler
        if self._pool is not None:
            CURRENT_POOL.set(self._pool)  # copied into every thread it starts (as_dask_task)
        self._worker = worker_address() or ""
        self._endpoints = list(endpoints)
        self._queues = list(queues) if queues is not None else list(range(len(endpoints)))
        if len(self._queues) != len(self._endpoints):
            raise ValueError(f"consumer {self.name}: {len(endpoints)} endpoints for {len(self._queues)} queues")
        # The queues by name, for the logs (a consumer made outside a pool knows their endpoints).
        names = [queue_name(self._pool[0], i) for i in self._queues] if self._pool else list(endpoints)
        # A new event per start: threads of an earlier start that are still winding down keep the
        # one that told them to stop.
        self._stop = threading.Event()
        self._leave_by = None
        self._fetching.set()
        link = Link(
            self.name,
            self._identity,
            self._endpoints,
            self._settings,
            self._stop,
            self._fetching,
            self._counters,
            keys=self._keys,
            early_ack=self._early_ack,
            alive=liveness_probe(self),
            queues=names,
        )
        runner = Runner(
            self.name,
            handler,
            link.post,
            self._stop,
            self._fetching,
            self._counters,
            max_concurrency=self._max_concurrency,
            defaults=self._defaults,
            crash_attempts=self._settings.crash_attempts,
            payload_key=self._payload_key,
            queues=names,
            # Room for the frames around the results, and for the seal.
            max_bytes=max(self._settings.max_message_size // 2, self._settings.max_message_size - 65536),
            early_ack=self._early_ack,
            worker=self._worker,
        )
        link.attach(runner)
        self._link, self._runner = link, runner
        runner.start_threads()
        if runner.inline:  # chunks run on the thread that owns the sockets; this one stands by
            self._exec = threading.Thread(
                target=as_dask_task(link.take_turns), name=f"zdq-standby-{self.name}", daemon=True
            )
        else:
            self._exec = threading.Thread(
                target=as_dask_task(runner.exec_loop), name=f"zdq-exec-{self.name}", daemon=True
            )
        # The sockets open in the background (issue 26, point 7): this call (and the actor's
        # constructor, placed started) returns without waiting for the I/O thread; an open that
        # fails is said by reach(), which the pool calls next anyway, and by health().
        self._started = True
        self._start_error = None
        exec_thread, stop = self._exec, self._stop  # this start's, whatever a later one sets
        self._opened = _Opened(lambda: self._sockets_opened(link, runner, exec_thread, stop))
        self._opened_by = time.monotonic() + self._settings.placement_timeout
        self._io = threading.Thread(
            target=as_dask_task(link.io_main), args=(self._opened,), name=f"zdq-consumer-{self.name}", daemon=True
        )
        self._io.start()
        if self._pool is not None:
            pool_in_use(self._pool)
        if self._source is not None:  # stopped without waiting (its source goes when a stop waits)
            remove_source(self._source)
        io = self._io
        self._source = Source(
            "consumer", self._pool[0] if self._pool else "", self.name, self.statistics, io.is_alive, owner=self
        )
        add_source(self._source)

    def _sockets_opened(self, link: Link, runner: Runner, exec_thread: threading.Thread | None, stop: threading.Event) -> None:
        """(On the I/O thread, once it opened its sockets or failed to.) Start the execution thread
        (after the I/O thread took the sockets and set itself as their owner), or note why the
        consumer cannot run: reach() raises it, health() reports it."""
        if link.open_error is None:
            if exec_thread is not None and not stop.is_set():
                exec_thread.start()
            return
        self._start_error = (
            f"consumer {self.name} on {self._worker or 'this process'} could not open its sockets "
            f"to {len(self._endpoints)} brokers: {link.open_error}"
        )
        stop.set()
        runner.shutdown()

    def set_endpoint(self, broker: int, endpoint: str) -> None:
        """The pool's queue ``broker`` was placed again: reconnect to its new endpoint (if this
        consumer serves it)."""
        if broker not in self._queues:
            return
        local = self._queues.index(broker)
        self._endpoints[local] = endpoint
        if self._link is not None:
            self._link.set_endpoint(local, endpoint)

    def cancel(self) -> None:
        """Stop asking for work; chunks already received still run and report. ``start()`` resumes."""
        self._fetching.clear()
        if self._link is not None:
            self._link.poke()

    def stop(self, timeout: float = 10.0, *, wait: bool = True) -> None:
        """Stop consuming and close every thread and socket. Idempotent.

        No chunk is taken from then on; the chunks running may end and report their results for
        ``timeout`` seconds. Then those still running, and every chunk not started, go back to
        their queues (a consumer that says goodbye costs them no attempt) and run again
        elsewhere; a task running then runs on here to its end (Python cannot stop a thread), its
        result dropped. ``wait``: return once the threads have ended, at most about ``timeout``
        seconds from the first stop; else at once (a later stop() waits, within the first one's
        timeout: a pool asks every consumer of a worker first, whose actor calls run one at a
        time, then waits for each)."""
        if self._started and self._pool is not None:
            pool_done(self._pool)
        self._started = False
        self._fetching.clear()
        if self._leave_by is None:
            # At most some 30 years: the threads' waits refuse longer ones (threading.TIMEOUT_MAX).
            self._leave_by = time.monotonic() + min(max(0.0, timeout), 1e9)
            if self._link is not None:
                self._link.leave_by(self._leave_by)  # before the stop event: the link reads it then
        self._stop.set()
        if self._link is not None:
            self._link.poke()
        if not wait:
            return
        if self._link is not None and self._io is not None and self._io.ident is not None:
            # The sockets' owner closes them once the chunks running ended, or at the deadline.
            self._link.closed.wait(max(0.0, self._leave_by + _CLOSE_GRACE - time.monotonic()))
        if self._runner is not None:
            self._runner.shutdown()
        # The threads end at once then, but one still running an abandoned task (left to run on).
        for thread in (self._io, self._exec):
            if thread is not None and thread.ident is not None:
                thread.join(max(0.0, self._leave_by - time.monotonic()) + _THREAD_END)
        # Last: the monitoring feed reports it once more, with what its last chunks did.
        source, self._source = self._source, None
        if source is not None:
            remove_source(source)

    def get_results(self, timeout: float) -> Any:
        """What the consumer class's own ``get_results()`` returns (daskqueue's
        ``ConsumerPool.results()`` asked each consumer so), within ``timeout`` seconds.

        The user's method runs on a thread of its own, not on the worker's actor thread, which
        every actor call of the worker (its brokers' too) goes through: one that hangs is left
        behind, named in the ``TimeoutError``. An answer that cannot be pickled (it could not
        travel) is a ``TypeError`` saying so, not a silence."""
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = self._handler.get_results()  # type: ignore[attr-defined]  # asked only of a class with it
            except BaseException as e:  # noqa: BLE001 - the caller's error
                box["error"] = e

        thread = threading.Thread(target=run, name=f"zdq-get-results-{self.name}", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(
                f"get_results() of consumer {self.name} did not return within {timeout:g} s (it is left running)"
            )
        if "error" in box:
            raise box["error"]
        try:
            cloudpickle.dumps(box["value"])
        except Exception as e:
            raise TypeError(
                f"get_results() of consumer {self.name} returned a {type(box['value']).__name__} that cannot be "
                f"pickled to travel to the driver: {type(e).__name__}: {e}"
            ) from None
        return box["value"]

    def statistics(self) -> ConsumerStats:
        counters, link = self._counters, self._link
        return ConsumerStats(
            name=self.name,
            worker=self._worker,
            running=self._io is not None and self._io.is_alive() and self._fetching.is_set(),
            chunks_received=counters.chunks_received,
            tasks_done=counters.tasks_done,
            tasks_failed=counters.tasks_failed,
            tasks_in_flight=0 if link is None else link.in_flight,
            bad_chunks=counters.bad_chunks,
            tasks_cancelled=counters.tasks_cancelled,
            tasks_expired=counters.tasks_expired,
            tasks_retried=counters.tasks_retried,
            unreachable=() if link is None else tuple(f"{q} at {e}: {why}" for q, e, why in link.reach()[1]),
        )

    async def reach(self, queues: list[str] | None = None) -> tuple[list[str], list[tuple[str, str, str]]]:
        """Wait (on the worker's event loop, holding no thread) until this consumer has heard from
        each of its brokers of ``queues`` (default: all), or reported it unreachable
        (``connect-timeout`` after connecting; or, heard from before, silent since: given two
        heartbeats to speak again); return the queues it reaches, and ``(queue, endpoint, why)``
        of those of ``queues`` it cannot.

        Raises
        ------
        PlacementError
            Its sockets could not be opened (see :meth:`start`), or its I/O thread did not open
            them within ``placement-timeout``: the message names the consumer and its worker."""
        settings = self._settings
        wanted = None if queues is None else set(queues)
        now = time.monotonic()
        give_up = now + settings.connect_timeout + 2 * settings.heartbeat_interval + 1.0
        # A broker found silent may have been resumed a moment ago: a broker that runs beats every
        # heartbeat interval, so it gets two beats to be heard before it is said unreached.
        silent_until = now + 2 * settings.heartbeat_interval + 0.5
        while True:
            link = self._link
            if link is None:
                return [], []
            if not self._sockets_ready():
                await asyncio.sleep(0.01)
                continue
            reached, unreached, pending = link.reach()
            if time.monotonic() < silent_until:
                pending = pending + link.silent()
            waiting = pending if wanted is None else [q for q in pending if q in wanted]
            if not waiting or time.monotonic() > give_up or self._stop.is_set():
                return reached, [u for u in unreached if wanted is None or u[0] in wanted]
            await asyncio.sleep(0.01)

    async def reach_here(
        self, keys: list[str], queues: list[str] | None = None
    ) -> dict[str, tuple[list[str], list[tuple[str, str, str]]] | str]:
        """:meth:`reach` of every consumer of ``keys`` (their Dask actor keys) that lives on this
        worker, awaited together: a pool asks one consumer per worker instead of each (one actor
        call per worker). By key: the answer, or the message of its :class:`PlacementError`; a
        key that holds no consumer here is left out (the pool asks that one itself)."""
        here = [(key, c) for key, c in local_actors(keys).items() if isinstance(c, Consumer)]
        answers = await asyncio.gather(*(c.reach(queues) for _, c in here), return_exceptions=True)
        out: dict[str, tuple[list[str], list[tuple[str, str, str]]] | str] = {}
        for (key, _), answer in zip(here, answers):
            if isinstance(answer, PlacementError):
                out[key] = str(answer)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                out[key] = answer
        return out

    def _sockets_ready(self) -> bool:
        """Whether the I/O thread opened the sockets (False: not yet). Raises the
        :class:`PlacementError` of an open that failed, or that took over ``placement-timeout``."""
        if self._start_error is not None:
            raise PlacementError(self._start_error)
        if self._opened is None or self._opened.is_set():
            return True
        if time.monotonic() <= self._opened_by:
            return False
        raise PlacementError(
            f"consumer {self.name} on {self._worker or 'this process'}: its I/O thread did not open its sockets "
            f"within placement-timeout ({self._settings.placement_timeout:g} s): its worker is overloaded or stuck"
        )

    def health(self) -> tuple[bool, str]:
        """``(True, state)``, or ``(False, why)`` when the consumer is not running although it
        should (its I/O thread died, it could not open its sockets, it reaches none of its
        brokers). Cheap: no socket is touched. A cancelled or stopped consumer is healthy: it is
        not meant to run. So is one whose brokers went silent after it reached them (see
        :meth:`checkup`): a replacement would not reach them either."""
        return self._health()

    def checkup(self) -> tuple[bool, str, list[str]]:
        """:meth:`health`, and the queues it reached once whose brokers it has heard nothing from
        for the heartbeat timeout since (the pool's supervisor asks who else reaches them)."""
        link = self._link
        healthy, why = self._health()
        return healthy, why, [] if link is None else link.silent()

    def _health(self) -> tuple[bool, str]:
        if self._start_error is not None:
            return False, self._start_error
        if not self._started:
            return True, "not started" if self._io is None else "stopped"
        try:
            if not self._sockets_ready():
                return True, "opening its sockets"
        except PlacementError as e:
            return False, str(e)
        link = self._link
        if link is not None and link.failure is not None:
            return False, f"consumer {self.name} stopped on its own: {link.failure}"
        if link is not None:
            reached, unreached, pending = link.reach()
            silent = set(link.silent())
            unreached = [u for u in unreached if u[0] not in silent]
            if unreached and not reached and not silent and not pending:
                where = "; ".join(f"{q} at {e}: {why}" for q, e, why in unreached)
                here = self._worker or "this process"
                return False, f"consumer {self.name} on {here} {REACHES_NONE} ({where})"
        threads: list[Any] = [self._io, self._exec]
        if self._stop.is_set() or not all(t is not None and t.is_alive() for t in threads):
            return False, f"consumer {self.name}: its I/O thread ended"
        return True, "running" if self._fetching.is_set() else "cancelled"

    def pid(self) -> int:
        return os.getpid()

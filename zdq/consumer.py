"""Consumers: the Dask actor that executes tasks, and the classes users subclass.

A :class:`Consumer` actor connects a DEALER to every broker of its pool, so no consumer idles while
another queue has work. Its I/O thread pulls chunks with credit (it keeps ``prefetch`` chunks in
hand so the next one is already there when one finishes), answers heartbeats, and sends results and
acknowledgements. Tasks never run on the Dask worker's event loop or executor.

With ``max_concurrency`` 1 (the default), the thread that owns the sockets runs each chunk itself:
handing it to another thread and back cost two thread wake-ups per chunk, a tenth of a single
task's round trip. A second thread stands by; when a chunk has run for ``_TAKEOVER`` (50 ms), it
takes the sockets over, so heartbeats, credit and control go on, and the first thread stands by in
turn once its chunk is done. Chunks still run one at a time. With ``max_concurrency`` > 1, an
execution thread unpickles chunks and fans their tasks out to that many task threads.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import random
import threading
import time
import traceback
from collections import deque
from typing import Any, Callable

import zmq

from zdq._actor import liveness_probe, worker_address
from zdq.config import PoolSettings
from zdq.errors import DeadLettered, TaskTimeout
from zdq.serialization import CALLS, ITEMS, ErrorInfo, TaskOptions, dumps_chunk, dumps_results, loads_chunk
from zdq.stats import ConsumerStats
from zdq.transport import protocol as p
from zdq.transport.security import ClientKeys
from zdq.transport.sockets import BrokerLinks, Waker, process_context, recv_ready, try_send

__all__ = ["ConsumerBaseClass", "GeneralConsumer", "Consumer"]

logger = logging.getLogger(__name__)

#: How long a busy consumer holds back its request for the next chunk of a broker, waiting for a
#: DONE to that broker to carry it: one message and one broker round fewer per chunk when chunks
#: are short (a single task's round trip), and a prefetch that is still on time when they are long.
_FETCH_DELAY = 0.001
#: Chunks that take at least this long to run (on average) make a consumer ask for the next ones as
#: soon as it starts one: the request's broker round is hidden behind the run.
_EAGER_FETCH = 0.00025
#: A chunk run on the thread that owns the sockets leaves heartbeats and credit unattended; after
#: this long, the standby thread takes the sockets over (see Consumer._take_turns).
_TAKEOVER = 0.05


class ConsumerBaseClass:
    """Base of user-defined consumers (the daskqueue API).

    Functions submitted with ``QueuePool.submit``/``batch_submit`` are called directly. Raw items
    sent with ``QueuePool.put``/``put_many`` are handed to :meth:`process_item`; what it returns is
    the item's result, what it raises is the item's error.

    >>> class Upper(ConsumerBaseClass):
    ...     def process_item(self, item):
    ...         return item.upper()
    >>> Upper(name="upper-0").process_item("a")
    'A'
    """

    def __init__(self, name: str = "", **kwargs: Any) -> None:
        self.name = name

    def process_item(self, item: Any) -> Any:
        raise NotImplementedError(
            f"{type(self).__name__} received a raw item; override process_item() to handle items put with put()"
        )


class GeneralConsumer(ConsumerBaseClass):
    """The default consumer: runs submitted functions; a raw item ``(fn, *args)`` is called too."""

    def process_item(self, item: Any) -> Any:
        if isinstance(item, tuple) and item and callable(item[0]):
            return item[0](*item[1:])
        raise TypeError(
            "GeneralConsumer runs functions: put() a tuple (fn, *args), use submit(), "
            "or give ConsumerPool a ConsumerClass whose process_item() handles this item"
        )


def _error_info(exc: BaseException) -> ErrorInfo:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    exc.__traceback__ = None  # frames do not pickle; the text above keeps them
    kind = type(exc)
    return ErrorInfo(exc, f"{kind.__module__}.{kind.__qualname__}", str(exc), tb)


class _ChunkRun:
    """One delivered chunk being executed; thread-safe completion for the fan-out path."""

    __slots__ = (
        "broker", "chunk_id", "base", "values", "errors", "remaining", "lock", "dead", "crashes", "kind", "options"
    )

    def __init__(
        self,
        broker: int,
        chunk_id: int,
        base: int,
        n: int,
        crashes: int = 0,
        kind: int = 0,
        options: TaskOptions | None = None,
    ) -> None:
        self.broker = broker
        self.kind = kind
        self.options = options
        self.crashes = crashes  # deliveries of this chunk that ended with their consumer's death
        self.dead: list[p.Dead] = []
        self.chunk_id = chunk_id
        self.base = base
        self.values: list[Any] = [None] * n
        self.errors: dict[int, ErrorInfo] = {}
        self.remaining = n
        self.lock = threading.Lock()


class _TaskThreads:
    """``n`` threads running the tasks of chunks, for ``max_concurrency`` > 1.

    Lighter than a ``ThreadPoolExecutor``, whose future, work item and locks per task were most of
    a consumer's CPU on short I/O-bound tasks (three times this for 5 ms sleeps). Tasks report
    through their chunk, so nothing per task is returned.
    """

    def __init__(self, n: int, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(n)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._queue.put((fn, args))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception:  # a task's own failure is caught inside; this would be zdq's
                logger.exception("a task thread of a consumer failed")

    def shutdown(self) -> None:
        """Drop the tasks not started (their chunks are leased, so they run again elsewhere) and
        let every thread end after its current task."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self._queue.put(None)


class Consumer:
    """Dask actor that pulls chunks from every broker of a pool and executes them.

    Parameters
    ----------
    name : str
        Display name (``GeneralConsumer-0``).
    identity : bytes
        16-byte routing identity, chosen by the pool so results can be attributed to it.
    consumer_class : type
        A :class:`ConsumerBaseClass` subclass, instantiated on the worker.
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
    ) -> None:
        self.name = name
        self._keys = keys
        self._payload_key = payload_key
        self._defaults = TaskOptions(retries=retries)
        self._identity = identity
        self._class = consumer_class
        self._settings = settings
        self._max_concurrency = max_concurrency
        self._early_ack = early_ack
        self._handler: ConsumerBaseClass | None = None
        self._ctx: zmq.Context[Any] | None = None
        self._io: threading.Thread | None = None
        self._exec: threading.Thread | None = None
        self._pool: _TaskThreads | None = None
        self._stop = threading.Event()
        self._fetching = threading.Event()
        self._chunks: queue.SimpleQueue[tuple[int, p.Deliver] | None] = queue.SimpleQueue()
        self._outbox: deque[tuple[int, p.Message]] = deque()
        self._waker: Waker | None = None
        self._links: BrokerLinks | None = None
        # Which thread owns the sockets, and since when it has been running a chunk itself (see
        # _take_turns); both change under _role.
        self._role = threading.Lock()
        self._owner = 0
        self._inline_since: float | None = None
        self._busy = False  # a chunk is running (max_concurrency 1): the next one waits for it
        self._ready: deque[tuple[int, p.Deliver]] = deque()  # chunks to run on the owning thread
        self._chunk_seconds = 0.0  # how long chunks take to run (moving average)
        self._credit: list[int] = []
        self._held: list[set[int]] = []
        self._fetch_at: list[float] = []
        self._next_beat = 0.0
        self._control: deque[tuple[int, str]] = deque()
        self._endpoints: list[str] = []
        self._worker = ""
        self._counts = {"chunks_received": 0, "tasks_done": 0, "tasks_failed": 0, "bad_chunks": 0}
        self._count_lock = threading.Lock()
        self._in_flight = 0
        self._alive: Callable[[], bool] = lambda: True

    # -- control plane --------------------------------------------------------------------------
    def start(self, endpoints: list[str]) -> None:
        """Connect to the brokers at ``endpoints`` and start consuming. Idempotent."""
        if self._io is not None and self._io.is_alive():
            self._fetching.set()
            return
        self._worker = worker_address() or ""
        self._alive = liveness_probe(self)
        self._handler = self._class(name=self.name)
        self._endpoints = list(endpoints)
        self._ctx = process_context()
        self._stop.clear()
        self._fetching.set()
        self._outbox.clear()
        self._ready.clear()
        if self._max_concurrency > 1:
            self._pool = _TaskThreads(self._max_concurrency, f"zdq-task-{self.name}")
            self._exec = threading.Thread(target=self._exec_loop, name=f"zdq-exec-{self.name}", daemon=True)
        else:  # chunks run on the thread that owns the sockets; this one stands by (_take_turns)
            self._exec = threading.Thread(target=self._take_turns, name=f"zdq-standby-{self.name}", daemon=True)
        ready = threading.Event()
        self._io = threading.Thread(target=self._io_loop, args=(ready,), name=f"zdq-consumer-{self.name}", daemon=True)
        self._io.start()
        ready.wait(10)
        self._exec.start()  # after the I/O thread took the sockets (and set itself as their owner)

    def set_endpoint(self, broker: int, endpoint: str) -> None:
        """Broker ``broker`` was replaced: reconnect to its new endpoint."""
        self._endpoints[broker] = endpoint
        self._control.append((broker, endpoint))
        self._poke()

    def cancel(self) -> None:
        """Stop asking for work; chunks already received still run and report. ``start()`` resumes."""
        self._fetching.clear()
        self._poke()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop consuming and close every thread and socket. Unstarted chunks go back. Idempotent."""
        self._fetching.clear()
        self._stop.set()
        self._poke()
        if self._io is not None:
            self._io.join(timeout)
        self._chunks.put(None)
        if self._exec is not None:
            self._exec.join(timeout)
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._ctx = None  # the process's context: its sockets were closed by the I/O thread

    def statistics(self) -> ConsumerStats:
        return ConsumerStats(
            name=self.name,
            worker=self._worker,
            running=self._io is not None and self._io.is_alive() and self._fetching.is_set(),
            tasks_in_flight=self._in_flight,
            **self._counts,
        )

    def pid(self) -> int:
        return os.getpid()

    # -- the I/O thread -------------------------------------------------------------------------
    def _poke(self) -> None:
        waker = self._waker
        if waker is not None:
            waker.wake()

    def _post(self, broker: int, msg: p.Message) -> None:
        """Hand a message to the thread that owns the sockets (from any thread)."""
        self._outbox.append((broker, msg))
        if self._owner != threading.get_ident():
            self._poke()  # the owner sleeps in poll; the owner itself sends it on its next turn

    def _io_loop(self, ready: threading.Event) -> None:
        assert self._ctx is not None
        self._owner = threading.get_ident()
        self._inline_since = None
        waker = self._waker = Waker(self._ctx)
        hello = p.encode(p.Hello(p.Role.CONSUMER, self.name.encode()[:256]))
        links = self._links = BrokerLinks(
            self._ctx, self._identity, hello, keys=self._keys, max_message_size=self._settings.max_message_size
        )
        links.poller.register(waker.socket, zmq.POLLIN)
        n = len(self._endpoints)
        self._credit = [0] * n
        self._held = [set() for _ in range(n)]  # chunks received and not yet done, per broker
        self._fetch_at = [0.0] * n  # when a busy consumer's FETCH goes out on its own (_FETCH_DELAY)
        self._next_beat = time.monotonic() + self._settings.heartbeat_interval
        self._in_flight = 0
        try:
            for endpoint in self._endpoints:
                links.add(endpoint)
        except Exception:
            logger.exception("consumer %s could not connect to its brokers", self.name)
            self._abandon()
            self._close_links()
            return
        finally:
            ready.set()
        self._take_turns()

    def _close_links(self) -> None:
        links, waker = self._links, self._waker
        self._links = self._waker = None
        if links is not None:
            links.close(farewell=p.encode(p.Bye()))
        if waker is not None:
            waker.close()

    def _take_turns(self) -> None:
        """Serve the sockets while this thread owns them, stand by while the other thread does.

        With ``max_concurrency`` 1 the thread that owns the sockets runs each chunk itself: no
        hand-off to another thread and back (two thread wake-ups per chunk fewer). While it runs
        one, the other thread stands by; if the chunk runs longer than ``_TAKEOVER``, it takes the
        sockets over (heartbeats, credit, control keep going), and the first becomes the standby
        when its chunk is done. The last owner closes the sockets.
        """
        me = threading.get_ident()
        while True:
            if self._owner == me:
                try:
                    stopped = self._serve()
                except Exception:
                    logger.exception("consumer %s I/O loop failed", self.name)
                    self._abandon()
                    stopped = True
                if stopped:
                    self._close_links()
                    return
            elif not self._stand_by():
                return

    def _stand_by(self) -> bool:
        """Wait for the owner's chunk to run long, then take the sockets over; False once stopped
        (the owner, serving, closes them)."""
        me = threading.get_ident()
        while True:
            stopping = self._stop.wait(_TAKEOVER)
            with self._role:
                since = self._inline_since
                if since is not None and (stopping or time.monotonic() - since >= _TAKEOVER):
                    self._owner = me
                    self._inline_since = None
                    return True
            if stopping:
                return False

    def _run_here(self, broker: int, deliver: p.Deliver) -> bool:
        """Run a chunk on the owning thread; False if the standby took the sockets meanwhile."""
        me = threading.get_ident()
        start = time.monotonic()
        with self._role:
            self._inline_since = start
            self._busy = True
        self._execute(broker, deliver)
        with self._role:
            self._busy = False
            kept = self._owner == me
            if kept:
                self._inline_since = None
        self._chunk_seconds = 0.8 * self._chunk_seconds + 0.2 * (time.monotonic() - start)
        if not kept:
            # This chunk's DONE waits in the outbox, and the next chunk waits for this one to end:
            # wake the new owner, asleep in poll.
            self._poke()
        return kept

    def _serve(self) -> bool:
        """The I/O loop; True when the consumer stops, False when the sockets were taken over."""
        links, waker = self._links, self._waker
        assert links is not None and waker is not None
        poller, socks = links.poller, links.socks
        credit, held, fetch_at = self._credit, self._held, self._fetch_at
        beat = self._settings.heartbeat_interval
        prefetch = self._settings.prefetch
        inline = self._pool is None
        ready = self._ready
        while not self._stop.is_set():
            while self._control:
                i, endpoint = self._control.popleft()
                links.replace(i, endpoint)
                credit[i] = 0
                fetch_at[i] = 0.0
                # Chunks held from the lost broker still run; their DONE goes to the replacement,
                # which acknowledges those it recovered from disk and counts the others as duplicates.
                self._in_flight -= len(held[i])
                held[i].clear()
            while self._outbox:
                i, out = self._outbox.popleft()
                if isinstance(out, (p.Done, p.Return, p.Split)) and out.chunk_id in held[i]:
                    held[i].discard(out.chunk_id)
                    self._in_flight -= 1
                ask = credit[i] == 0 and self._in_flight < prefetch and self._fetching.is_set()
                if isinstance(out, p.Done) and ask:
                    out = out._replace(credit=1)
                    credit[i] = int(try_send(socks[i], p.encode(out)))
                else:
                    try_send(socks[i], p.encode(out))
            now = time.monotonic()
            wake_at = min(self._next_beat, self._ask_for_chunks(socks, now, eager=False))
            run_next = bool(ready) and not self._busy  # busy: the thread it runs on pokes when done
            timeout = 0 if run_next else max(0, math.ceil((wake_at - now) * 1000))
            for sock, _ in poller.poll(timeout):
                index = links.index(sock)
                if index is None:
                    waker.drain()
                    continue
                i = index
                for frames in recv_ready(sock, 1):
                    try:
                        msg = p.decode(frames)
                    except Exception as e:
                        self._counts["bad_chunks"] += 1
                        logger.warning("consumer %s dropped a malformed message: %s", self.name, e)
                        continue
                    if isinstance(msg, p.Deliver):
                        credit[i] = max(0, credit[i] - 1)
                        fetch_at[i] = time.monotonic() + _FETCH_DELAY
                        self._counts["chunks_received"] += 1
                        self._in_flight += 1
                        held[i].add(msg.chunk_id)
                        if self._early_ack:
                            try_send(sock, p.encode(p.Ack(msg.chunk_id)))
                        if inline:
                            ready.append((i, msg))
                        else:
                            self._chunks.put((i, msg))
                    elif isinstance(msg, p.Bye):
                        credit[i] = 0  # the broker is going away; ask again if it comes back
            now = time.monotonic()
            if now >= self._next_beat:
                if not self._alive():
                    logger.info("consumer %s: its actor was released; stopping", self.name)
                    self._abandon()
                    return True
                for sock in socks:
                    try_send(sock, p.encode(p.Heartbeat()))
                self._next_beat = now + beat
            if ready and not self._busy and not self._stop.is_set():
                if self._chunk_seconds >= _EAGER_FETCH:
                    # Chunks take a while: ask for the next ones now, so that they arrive while
                    # this one runs (the sockets are not read until it is done).
                    self._ask_for_chunks(socks, now, eager=True)
                if not self._run_here(*ready.popleft()):
                    return False
        return True

    def _ask_for_chunks(self, socks: list[zmq.Socket[Any]], now: float, *, eager: bool) -> float:
        """Send the FETCHes due; return when the next one held back falls due.

        One outstanding request per broker while fewer than ``prefetch`` chunks are held. A
        consumer with nothing in hand asks at once (so does an ``eager`` one); a busy one lets its
        next DONE to that broker carry the request, unless that takes longer than _FETCH_DELAY.
        """
        due = math.inf
        if not self._fetching.is_set():
            return due
        credit, fetch_at, prefetch = self._credit, self._fetch_at, self._settings.prefetch
        for i, sock in enumerate(socks):
            if credit[i] == 0 and self._in_flight < prefetch:
                if eager or self._in_flight == 0 or now >= fetch_at[i]:
                    if try_send(sock, p.encode(p.Fetch(1))):
                        credit[i] = 1
                else:
                    due = min(due, fetch_at[i])
        return due

    def _abandon(self) -> None:
        """Stop from inside the I/O thread: end the execution thread and the task threads too."""
        self._fetching.clear()
        self._stop.set()
        self._chunks.put(None)
        if self._pool is not None:
            self._pool.shutdown()

    # -- execution ------------------------------------------------------------------------------
    def _exec_loop(self) -> None:
        """The execution thread of ``max_concurrency`` > 1: unpickle chunks, fan their tasks out."""
        while True:
            item = self._chunks.get()
            if item is None:
                return
            self._execute(*item)

    def _execute(self, broker: int, deliver: p.Deliver) -> None:
        try:
            self._start_chunk(broker, deliver)
        except Exception:  # a task's own failure is caught inside; this would be zdq's
            logger.exception("consumer %s failed to run chunk %d", self.name, deliver.chunk_id)

    def _start_chunk(self, broker: int, deliver: p.Deliver) -> None:
        """Unpickle a chunk and run it (inline), or hand its tasks to the task threads."""
        if self._stop.is_set() or not self._fetching.is_set():
            # Not started: give it back so another consumer runs it, without using an attempt.
            self._post(broker, p.Return(deliver.chunk_id))
            return
        try:
            base, kind, tasks, options = loads_chunk(deliver.chunk, self._payload_key)
            if len(tasks) != deliver.n_tasks:
                raise ValueError(f"chunk holds {len(tasks)} tasks, its header says {deliver.n_tasks}")
        except Exception as e:
            self._counts["bad_chunks"] += 1
            logger.error("consumer %s cannot decode chunk %d: %s", self.name, deliver.chunk_id, e)
            info = ErrorInfo(None, "zdq.errors.ProtocolError", f"chunk {deliver.chunk_id} does not decode: {e}", "")
            bad = _ChunkRun(broker, deliver.chunk_id, 0, deliver.n_tasks)
            self._finish(bad, dict.fromkeys(range(deliver.n_tasks), info))
            return
        if deliver.attempt > 1 and len(tasks) > 1:
            # A consumer died holding this chunk. Split it so that a task that kills its
            # consumer is tried alone, and the others are not dragged down with it.
            key = self._payload_key
            parts = [dumps_chunk(base + i, [task], key, kind, options) for i, task in enumerate(tasks)]
            self._post(broker, p.Split(deliver.chunk_id, parts))
            return
        run = _ChunkRun(broker, deliver.chunk_id, base, len(tasks), deliver.attempt - 1, kind, options)
        if self._pool is None:
            self._run_inline(run, tasks)
        else:
            for i, task in enumerate(tasks):
                self._pool.submit(self._run_one, run, i, task)

    def _call(self, run: _ChunkRun, entry: Any) -> Any:
        if run.kind == CALLS:
            return entry[0](*entry[1:])
        if run.kind == ITEMS or entry[0] is None:
            assert self._handler is not None
            return self._handler.process_item(entry if run.kind == ITEMS else entry[1])
        if len(entry) == 2:
            return entry[0](*entry[1])
        return entry[0](*entry[1], **(entry[2] or {}))

    def _run_inline(self, run: _ChunkRun, tasks: list[Any]) -> None:
        values = run.values
        careful = run.options is not None or run.crashes > 0
        if run.kind == CALLS and not careful:
            # The hot loop of no-op benchmarks: nothing but the call, per task.
            for i, c in enumerate(tasks):
                try:
                    values[i] = c[0](*c[1:])
                except BaseException as e:  # a task's failure is its result, whatever it raised
                    self._run_careful(run, i, c, failed=e)
        else:
            call = self._call
            for i, task in enumerate(tasks):
                if careful or (run.kind == 0 and len(task) > 3):
                    self._run_careful(run, i, task)
                    continue
                try:
                    values[i] = call(run, task)
                except BaseException as e:
                    self._run_careful(run, i, task, failed=e)
        self._finish(run)

    def _run_one(self, run: _ChunkRun, i: int, task: tuple[Any, ...]) -> None:
        if run.options is not None or run.crashes or (run.kind == 0 and len(task) > 3):
            self._run_careful(run, i, task)
        else:
            try:
                run.values[i] = self._call(run, task)
            except BaseException as e:
                self._run_careful(run, i, task, failed=e)
        with run.lock:
            run.remaining -= 1
            last = run.remaining == 0
        if last:
            self._finish(run)

    def _options(self, run: _ChunkRun, task: Any) -> TaskOptions:
        if run.kind == 0 and len(task) > 3 and isinstance(task[3], TaskOptions):
            return task[3]
        return run.options or self._defaults

    def _run_careful(
        self, run: _ChunkRun, i: int, task: tuple[Any, ...], failed: BaseException | None = None
    ) -> None:
        """Run a task with its options: time limit, retries, and the count of earlier crashes.

        ``failed`` is the error of a first attempt already made on the fast path.
        """
        options = self._options(run, task)
        allowed = options.retries + 1
        if run.crashes:
            allowed = max(allowed, self._settings.crash_attempts)
            if run.crashes >= allowed:
                tid = run.base + i
                exc = DeadLettered(f"task {tid} killed its consumer {run.crashes} times; it was dead-lettered")
                self._dead_letter(run, i, task, _error_info(exc))
                return
        attempt = run.crashes
        error = failed
        while True:
            if error is None:
                attempt += 1
                try:
                    run.values[i] = self._call_limited(run, task, options.time_limit, run.base + i)
                    return
                except BaseException as e:
                    error = e
            else:  # the first attempt ran on the fast path
                attempt += 1
            if attempt < allowed and isinstance(error, options.retry_on) and not self._stop.is_set():
                delay = min(options.retry_backoff * 2 ** (attempt - 1), options.retry_backoff_max)
                time.sleep(delay * random.uniform(0.5, 1.5))  # jitter: retries do not stampede
                error = None
                continue
            info = _error_info(error)
            if options.retries > 0 or run.crashes:
                self._dead_letter(run, i, task, info, attempt)
            else:
                with run.lock:
                    run.errors[i] = info
            return

    def _dead_letter(self, run: _ChunkRun, i: int, task: tuple[Any, ...], info: ErrorInfo, attempts: int = 0) -> None:
        tid = run.base + i
        if attempts and info.exception is not None and hasattr(info.exception, "add_note"):
            info.exception.add_note(f"zdq: task {tid} failed {attempts} attempts and was dead-lettered")
        reason = f"task {tid} ({attempts or run.crashes} attempts): {info.type_name}: {info.message}\n{info.traceback}"
        try:
            payload = dumps_chunk(tid, [task], self._payload_key, run.kind, run.options)
        except Exception as e:  # it was unpickled from a chunk, so this is unexpected: keep the error
            logger.error("consumer %s cannot dead-letter task %d: %s", self.name, tid, e)
        else:
            with run.lock:
                run.dead.append(p.Dead(run.chunk_id, tid, payload, reason.encode()))
        with run.lock:
            run.errors[i] = info

    def _call_limited(self, run: _ChunkRun, task: Any, limit: float | None, tid: int) -> Any:
        if limit is None:
            return self._call(run, task)
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = self._call(run, task)
            except BaseException as e:
                box["error"] = e

        # Python cannot kill a thread: a task past its limit is abandoned to finish on its own
        # (a daemon thread), and the consumer moves on.
        thread = threading.Thread(target=target, name=f"zdq-timed-{self.name}-{tid}", daemon=True)
        thread.start()
        thread.join(limit)
        if thread.is_alive():
            raise TaskTimeout(f"task {tid} ran longer than its time limit of {limit}s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _finish(self, run: _ChunkRun, errors: dict[int, ErrorInfo] | None = None) -> None:
        errors = run.errors if errors is None else errors
        n = len(run.values)
        with self._count_lock:
            self._counts["tasks_failed"] += len(errors)
            self._counts["tasks_done"] += n - len(errors)
        for dead in run.dead:  # before DONE, so the broker still knows the chunk they come from
            self._post(run.broker, dead)
        payload = dumps_results(run.base, run.values, errors, self._payload_key)
        self._post(run.broker, p.Done(run.chunk_id, n, payload))

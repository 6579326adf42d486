"""Helpers for code that runs inside a Dask actor on a worker."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Mapping
from typing import Any, Callable

__all__ = [
    "worker_address",
    "scheduler_address",
    "liveness_probe",
    "local_actors",
    "PLACED_TOPIC",
    "tell_placed",
    "scheduler_call",
    "scheduler_workers",
    "candidate_workers",
    "pick_worker",
    "beside_brokers",
    "as_dask_task",
    "CURRENT_POOL",
    "pool_in_use",
    "pool_done",
    "when_pool_done",
]


def _worker() -> Any:
    from distributed import get_worker

    try:
        return get_worker()
    except ValueError:
        return None


def worker_address() -> str | None:
    worker = _worker()
    return None if worker is None else str(worker.address)


def scheduler_address() -> str | None:
    """The address this worker reaches its scheduler at (None outside a worker)."""
    worker = _worker()
    scheduler = getattr(worker, "scheduler", None)
    address = getattr(scheduler, "address", None)
    return None if address is None else str(address)


def local_actors(keys: list[str]) -> dict[str, Any]:
    """The actors this worker holds under ``keys`` (their Dask keys), by key; a key it does not
    hold (or holds while its constructor runs) is left out. Empty outside a worker."""
    actors = getattr(getattr(_worker(), "state", None), "actors", None) or {}
    return {key: actors[key] for key in keys if actors.get(key) is not None}


def liveness_probe(instance: object) -> Callable[[], bool]:
    """A check that says whether ``instance`` is still a live actor on its worker.

    Dask drops an actor from ``worker.state.actors`` when its last future is released (the pool
    object was closed or garbage-collected) but calls no hook: the actor's own threads poll this
    to stop by themselves instead of running forever. Called from the actor's constructor, it
    follows the actor's key, which Dask holds (with ``None``) while the constructor runs.
    """
    worker = _worker()
    state = getattr(worker, "state", None)
    actors = getattr(state, "actors", None)
    if actors is None:
        return lambda: True
    keys = [k for k, v in actors.items() if v is instance]
    if keys:
        key = keys[0]
        return lambda: actors.get(key) is instance
    key = _constructing(actors)
    if key is None:
        return lambda: True
    # Asked in the actor's constructor (a consumer started at placement): Dask holds the actor's
    # key with None until the constructor returns, then the instance; released, the key goes.
    return lambda: (held := actors.get(key, _GONE)) is instance or held is None


_GONE = object()

#: The scheduler's event topic on which an actor opened in its constructor tells its client what
#: it would have answered a call (see :func:`tell_placed`). Dask keeps a topic's last
#: ``distributed.admin.low-level-log-length`` events: bounded, whatever the placements.
PLACED_TOPIC = "zdq-placed"


def tell_placed(what: list[Any]) -> bool:
    """From an actor's constructor: tell the scheduler ``what`` (msgpack-able, no secret: any
    client of the cluster can read it) under the actor's key, one message on the worker's batched
    stream, ahead of the message that says the actor was created. The client reads every actor's
    in one round trip once all are created (:func:`zdq.client.slots.placed_reports`) instead of
    calling each. False outside a constructor (nothing told: the client asks the actor)."""
    worker = _worker()
    actors = getattr(getattr(worker, "state", None), "actors", None)
    key = None if actors is None else _constructing(actors)
    if key is None:
        return False
    worker.log_event(PLACED_TOPIC, {"key": str(key), "what": what})
    return True


def _constructing(actors: Mapping[Any, Any]) -> Any:
    """The key of the actor whose constructor runs on this thread (Dask names the task it runs
    in ``dask.context.thread_state``), or None."""
    from dask.context import thread_state  # what distributed.utils.set_thread_state sets

    key = getattr(thread_state, "key", None)
    return key if key is not None and key in actors and actors[key] is None else None


def check_resources(resources: Any) -> dict[str, float] | None:
    """``resources=`` of a pool, checked: a mapping of resource names to positive amounts."""
    if resources is None:
        return None
    if not isinstance(resources, Mapping) or not resources or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
        for k, v in resources.items()
    ):
        raise ValueError(
            f"resources must map resource names to positive amounts, like {{'GPU': 1}}, got {resources!r:.80}"
        )
    return {k: float(v) for k, v in resources.items()}


def scheduler_call(client: Any, what: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``method(*args, **kwargs)``, a synchronous call of ``client``'s that asks its scheduler
    (``client.sync``, ``run_on_scheduler``, ``get_dataset`` ...: they all take
    ``callback_timeout``), bounded by ``placement-timeout``: a scheduler that does not answer
    (stopped, overloaded, unreachable) is a :class:`~zdq.errors.PlacementError` naming it and
    ``what`` was asked, never a wait without end."""
    from zdq.config import _seconds, get
    from zdq.errors import PlacementError

    timeout = _seconds(get("placement-timeout"))
    try:
        return method(*args, callback_timeout=timeout, **kwargs)
    except TimeoutError as e:
        address = getattr(client.scheduler, "address", "?")
        raise PlacementError(
            f"the scheduler {address} did not answer {what} within placement-timeout ({timeout:g} s): "
            "it is stopped, overloaded or unreachable"
        ) from e


def scheduler_workers(client: Any) -> dict[str, Any]:
    """The scheduler's live workers, asked now: address -> what the scheduler knows of it
    (``name``, ``resources``, ``nthreads`` ...). The one place zdq asks, bounded as
    :func:`scheduler_call` bounds it.

    Not ``client.scheduler_info()``: that returns the client's cached identity after fetching it,
    and Dask's own periodic refresh (every ``distributed.client.scheduler-info-interval``) writes
    an identity without workers there (it asks for ``n_workers=0``). A refresh landing between the
    fetch and the read showed placement an empty cluster ("no worker is available"): 15 of 1,500
    lists were wrong with the refresh every 5 ms, and now and then with the default 2 s."""
    identity = scheduler_call(client, "the list of its workers", client.sync, client.scheduler.identity, n_workers=-1)
    return dict(identity["workers"])


def allowed_workers(client: Any, workers: Any) -> list[str] | None:
    """``workers=`` of a pool: addresses or names, as given, plus the name of each worker given
    by address (a nanny restarts a killed worker at a new address under the same name, and a
    durable queue must be placed again there)."""
    if workers is None:
        return None
    if isinstance(workers, str) or not all(isinstance(w, str) for w in workers):
        raise TypeError(f"workers must be a list of worker addresses or names, got {workers!r:.80}")
    allowed = list(workers)
    known = scheduler_workers(client)
    for address in workers:
        name = known.get(address, {}).get("name")
        if name is not None and str(name) not in allowed:
            allowed.append(str(name))
    return allowed


def candidate_workers(
    client: Any,
    allowed: list[str] | None,
    resources: dict[str, float] | None = None,
    known: dict[str, Any] | None = None,
) -> list[str]:
    """Addresses of the live workers an actor may be placed on, in a stable order.

    ``allowed`` holds worker addresses or names; names survive a worker's restart by its nanny,
    so a pool restricted by name keeps placing replacements where it should. ``resources``: only
    workers that declare at least those amounts (``dask worker --resources "GPU=1"``).
    """
    workers = known if known is not None else scheduler_workers(client)
    addresses = sorted(workers)
    if allowed is not None:
        wanted = {str(a) for a in allowed}
        addresses = [a for a in addresses if a in wanted or str(workers[a].get("name")) in wanted]
    if resources:
        addresses = [
            a for a in addresses
            if all((workers[a].get("resources") or {}).get(k, 0) >= v for k, v in resources.items())
        ]
    return addresses


def _no_worker(client: Any, allowed: list[str] | None, resources: dict[str, float] | None) -> str:
    """Why no worker can take an actor, in words a user can act on."""
    if resources:
        declared = sorted(
            {k for w in scheduler_workers(client).values() for k in (w.get("resources") or {})}
        )
        wanted = ",".join(f"{k}={v:g}" for k, v in resources.items())
        return (
            f"no worker{' of ' + str(allowed) if allowed else ''} declares the resources {resources} "
            f"(the workers declare {declared or 'none'}): start workers with "
            f'`dask worker --resources "{wanted}"`, or place the pool without resources='
        )
    if allowed is not None:
        return f"{NO_WORKER[0]} workers={allowed}"
    return f"{NO_WORKER[1]} to place zdq actors on"


#: How a placement that found no worker it may use says so (``pick_worker``'s error begins so).
NO_WORKER = ("no live worker matches", "no worker is available")


#: Workers that did not answer a placement (stopped, e.g. by SIGSTOP, or hung), by address, with
#: the time (``time.monotonic()``) until which placements of this process pass them over while
#: another candidate remains: a queue placed again, or a consumer replaced, is not sent back to a
#: worker that let the last attempt wait out its bound. Owned here, under ``_unanswered_lock``.
_unanswered: dict[str, float] = {}
_unanswered_lock = threading.Lock()
#: How long a worker that did not answer is passed over.
UNANSWERED_FOR = 300.0


def note_unanswered(address: str, seconds: float = UNANSWERED_FOR) -> None:
    """Worker ``address`` did not answer a placement within its bound: pass it over for a while."""
    with _unanswered_lock:
        _unanswered[address] = time.monotonic() + seconds


def _answering(workers: list[str]) -> list[str]:
    """``workers`` without those passed over (see :data:`_unanswered`), unless that leaves none."""
    if not _unanswered:
        return workers
    now = time.monotonic()
    with _unanswered_lock:
        for address in [a for a, until in _unanswered.items() if until <= now]:
            del _unanswered[address]
        fresh = [w for w in workers if w not in _unanswered]
    return fresh or workers


def pick_worker(
    client: Any,
    allowed: list[str] | None,
    slot: int,
    placed_on: dict[int, str],
    resources: dict[str, float] | None = None,
    known: dict[str, Any] | None = None,
    prefer: str | None = None,
) -> str:
    """The worker for actor ``slot`` of a pool: spread by slot, never where it was just lost.

    ``placed_on`` remembers each slot's worker; a slot placed again avoids its previous worker,
    which the scheduler may not yet know is dead, and every worker that did not answer a recent
    placement (:func:`note_unanswered`), while others remain. ``known``: the scheduler's workers,
    when the caller places many actors at once (asking the scheduler once, not per actor).
    ``prefer``: the worker to take if it is a candidate (see :func:`beside_brokers`).
    """
    from zdq.errors import PlacementError

    workers = _answering(candidate_workers(client, allowed, resources, known))
    lost = placed_on.get(slot)
    if lost is not None and len(workers) > 1 and lost in workers:
        workers.remove(lost)
    if not workers:
        raise PlacementError(_no_worker(client, allowed, resources))
    address = prefer if prefer is not None and prefer in workers else workers[slot % len(workers)]
    placed_on[slot] = address
    return address


def beside_brokers(workers: list[str], serves: list[list[int]], broker_workers: list[str]) -> list[str]:
    """The worker of each consumer slot of a pool placed at once: as many on each worker as
    spreading by slot puts there (``workers[slot % len(workers)]``), but a slot goes, where it
    can, to a worker that hosts the broker of one of the queues it ``serves`` (``broker_workers``:
    the worker of each queue, "" where unknown).

    A consumer reaches a broker of its own process over inproc: no TCP connection and no
    CurveZMQ handshake (about 1 ms of CPU each, most of what placing a pool costs beyond Dask's
    own work per actor; issue 26, point 7), and each task's hops stay in the process. Pure:
    which queues a slot serves is unchanged, only where it runs.

    >>> beside_brokers(["a", "b", "c", "d"], [[0, 1]] * 4 + [[2, 3]] * 4, ["c", "d", "a", "b"])
    ['c', 'c', 'd', 'd', 'a', 'a', 'b', 'b']
    >>> beside_brokers(["a", "b"], [[0], [0], [0]], ["z"])  # no broker on a candidate: by slot
    ['a', 'b', 'a']
    """
    n, width = len(serves), len(workers)
    room: dict[str, int] = {}
    for slot in range(n):
        room[workers[slot % width]] = room.get(workers[slot % width], 0) + 1
    chosen: list[str | None] = [None] * n
    for slot, queues in enumerate(serves):
        for q in queues:
            host = broker_workers[q] if 0 <= q < len(broker_workers) else ""
            if room.get(host, 0) > 0:
                chosen[slot] = host
                room[host] -= 1
                break
    free = [w for w in workers for _ in range(room.get(w, 0))]  # what is left, in worker order
    taken: list[str] = []
    for slot in range(n):
        if chosen[slot] is None:
            default = workers[slot % width]
            pick = default if default in free else free[0]
            free.remove(pick)
            chosen[slot] = pick
        taken.append(chosen[slot])  # type: ignore[arg-type]
    return taken


# -- Dask idioms inside zdq tasks ------------------------------------------------------------------
# A zdq task runs on a consumer's own threads, not in Dask's thread pool. Dask finds "the worker
# running this task" through a context variable that its pool sets, and secede()/rejoin() through
# the thread's pool state. Our threads get the same: the context of the actor call that started
# them (where get_worker() works), and a pool state in which leaving and rejoining are no-ops, since
# a zdq thread holds no slot of Dask's pool.


class _NoSlots:
    """What ``distributed.secede``/``rejoin`` see as the thread pool of a zdq thread."""

    class _Threads:
        def remove(self, thread: Any) -> None:
            pass

    def __init__(self) -> None:
        self._threads = self._Threads()
        self._rejoin_lock = threading.Lock()
        self._rejoin_list: list[tuple[Any, threading.Event]] = []

    def _adjust_thread_count(self) -> None:
        pass

    def submit(self, fn: Callable[[], object]) -> None:  # rejoin() waits for this to wake it
        with self._rejoin_lock:
            waiting, self._rejoin_list = self._rejoin_list, []
        for _, event in waiting:
            event.set()


_NO_SLOTS = _NoSlots()


def as_dask_task(target: Callable[..., Any]) -> Callable[..., Any]:
    """``target`` wrapped so that the zdq tasks it runs may call ``get_worker()``, ``get_client()``,
    ``worker_client()``, ``secede()`` and ``rejoin()`` as Dask tasks do.

    Call it where the thread is made (in the actor's call, or in a thread already wrapped): it
    takes a copy of that context; each thread needs its own copy.
    """
    context = contextvars.copy_context()

    def run(*args: Any, **kwargs: Any) -> Any:
        from distributed.threadpoolexecutor import thread_state as pool_state
        from dask.context import thread_state as task_state  # what distributed.worker reads

        pool_state.executor = _NO_SLOTS  # what secede() leaves and rejoin() comes back to
        pool_state.proceed = True
        task_state.start_time = time.time()
        task_state.key = "zdq-task"  # no Dask task: the worker ignores a secede of it
        return context.run(target, *args, **kwargs)

    return run


# -- the pool of the task that runs ------------------------------------------------------------------
#: (name, dirpath) of the pool whose consumer runs the current task (set by the consumer actor on
#: the threads it starts); ``zdq.current_pool()`` attaches to that pool from inside the task.
CURRENT_POOL: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar(
    "zdq_current_pool", default=None
)
_users_lock = threading.Lock()
_users: dict[tuple[str, str | None], int] = {}
_closers: dict[tuple[str, str | None], Callable[[], None]] = {}


def pool_in_use(pool: tuple[str, str | None]) -> None:
    """A consumer of ``pool`` started in this process."""
    with _users_lock:
        _users[pool] = _users.get(pool, 0) + 1


def pool_done(pool: tuple[str, str | None]) -> None:
    """A consumer of ``pool`` stopped: with the last one, what tasks attached to it is closed."""
    with _users_lock:
        left = _users.get(pool, 0) - 1
        if left > 0:
            _users[pool] = left
            return
        _users.pop(pool, None)
        closer = _closers.pop(pool, None)
    if closer is not None:
        closer()


def when_pool_done(pool: tuple[str, str | None], closer: Callable[[], None]) -> None:
    """Run ``closer`` when the last consumer of ``pool`` in this process stops."""
    with _users_lock:
        _closers[pool] = closer

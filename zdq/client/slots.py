"""Actor slots and their supervisor, written once for both pools.

A pool places one actor per slot (a broker per queue, a consumer per consumer slot) and replaces
the actor of a slot when its worker is lost. Two threads touch the slots: the user's (placing at
start, releasing at close) and the pool's supervisor (replacing). Before this module each pool
kept its own lists, written by the supervisor and cleared by ``close()`` without a lock, and a
recovery that finished after ``close()`` wrote into cleared lists and died with an
``IndexError`` (issue 22, defect 2).

Ownership
---------
==================================  =================================================================
state                               owner
==================================  =================================================================
``ActorSlots._futures/_actors``     ``ActorSlots._lock``; written by :meth:`ActorSlots.adopt` and
                                    :meth:`ActorSlots.take_all` only
``ActorSlots._closed``              ``ActorSlots._lock``: set once by ``take_all``; ``adopt`` after it
                                    refuses (the caller releases what it placed)
``Supervisor._thread``              the pool's user thread (``start``/``stop``)
``_EXITING``, ``_running``          this module: set by the interpreter's exit hook
==================================  =================================================================

At interpreter exit (a script that ends without ``close()``, as daskqueue scripts do) Dask tears
its cluster down: workers die, and a supervisor would see every actor lost and fight the teardown
by placing them again, with a warning for each. :func:`_at_exit` runs before Dask's own exit hooks
(registered after them) and stops every supervisor first, so zdq goes quietly.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import math
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Container
from typing import Any, Generic, TypeVar

import distributed

from zdq._actor import NO_WORKER, PLACED_TOPIC, note_unanswered, pick_worker, scheduler_workers
from zdq.errors import PlacementError
from zdq.names import counted

__all__ = [
    "ActorSlots",
    "answers_within",
    "Supervisor",
    "client_closed",
    "dask_result",
    "exiting",
    "gather_actors",
    "place_actor",
    "place_on_the_rest",
    "placed_reports",
    "release_future",
    "stop_created",
    "wait_created",
    "workers_left",
]

logger = logging.getLogger(__name__)
#: Seconds a failed placement spends stopping what it created (what does not answer stops alone).
_STOP_CREATED_WAIT = 3.0
#: While actors are being created, how often the scheduler is asked whether their workers left.
_LOOK_FOR_LEFT_EVERY = 1.0
#: How long a placement tried again after workers left waits for one it may use to come back.
_COME_BACK = 10.0
#: The first try of a placement waits for its actors a quarter of the bound, and at least this
#: long: a worker that does not answer by then is passed over by the second try (see
#: :func:`place_on_the_rest`).
_TRY_AT_LEAST = 10.0

A = TypeVar("A")
K = TypeVar("K")

_EXITING = threading.Event()
#: Every supervisor running in this process (weakly): the exit hook stops them.
_running: weakref.WeakSet[Supervisor] = weakref.WeakSet()
_running_lock = threading.Lock()


def exiting() -> bool:
    """Whether the interpreter is shutting down (zdq's exit hook has run)."""
    return _EXITING.is_set()


def _at_exit() -> None:
    _EXITING.set()
    with _running_lock:
        supervisors = list(_running)
    for supervisor in supervisors:
        supervisor.stop(join=0.5)


# Registered when zdq's client side is imported, after distributed (imported above it by every
# pool module): atexit runs hooks last in, first out, so this one runs before Dask closes its
# clusters.
atexit.register(_at_exit)


def place_actor(
    client: Any,
    cls: type,
    args: tuple[Any, ...],
    *,
    slot: int,
    allowed: list[str] | None,
    placed_on: dict[int, str],
    resources: dict[str, float] | None,
    key: str,
    known: dict[str, Any] | None = None,
    prefer: str | None = None,
) -> Any:
    """Create the actor of ``slot`` on one worker (spread by slot, avoiding the lost ones; see
    :func:`zdq._actor.pick_worker`, which notes the choice in ``placed_on``; ``prefer``: the
    worker to take if it can): its Dask future."""
    address = pick_worker(client, allowed, slot, placed_on, resources, known, prefer)
    return client.submit(
        cls, *args, actor=True, workers=[address], allow_other_workers=False, pure=False, key=f"{key}-{uuid.uuid4().hex[:8]}"
    )


def wait_created(client: Any, placing: list[tuple[str, Any, str]], timeout: float, known: dict[str, Any], what: str) -> None:
    """Wait (``timeout`` for all) until the actors of ``placing`` ``(label, future, worker
    address)`` are created; raise :class:`PlacementError` naming each one that was not, its
    worker, and whether that worker left the cluster (killed, crashed) or is still there without
    answering (stopped, e.g. by SIGSTOP, or too busy). ``known``: the scheduler's workers when
    placing began (for their names). Waited for before the proxies are gathered, so that a late
    actor is named, and no wait of Dask's own is left behind to fail unseen."""
    deadline = time.monotonic() + timeout
    while True:
        pending = [(label, fut, address) for label, fut, address in placing if not fut.done()]
        if not pending:
            return
        # In steps: a worker killed while its actor is made leaves that actor's task waiting
        # for a worker Dask will never have (it is pinned there), and the whole bound was waited
        # for nothing. Between steps the scheduler is asked whether a worker waited on left.
        step = min(_LOOK_FOR_LEFT_EVERY, deadline - time.monotonic())
        if step <= 0:
            break
        try:
            distributed.wait([fut for _, fut, _ in pending], timeout=step)
        except TimeoutError:
            pass  # said below, naming who did not answer
        if time.monotonic() >= deadline:
            break
        present = _present(client)
        if present is not None and any(_left(address, present) for _, fut, address in pending if not fut.done()):
            break
    late = [(label, address) for label, fut, address in placing if not fut.done()]
    if not late:
        return
    present = _present(client)
    if present is None:  # the scheduler itself is out of reach: say what is known
        present = set(known)

    def worker(address: str) -> str:
        name = known.get(address, {}).get("name")
        return f"{address} (worker {name})" if name is not None and str(name) != address else address

    # Stopped early, a worker waited on having left: the others were not yet late, only unfinished.
    waited = min(timeout, timeout - (deadline - time.monotonic()))
    early = waited < timeout
    within = f"after {waited:.1f} s (of {timeout:g})" if early else f"within {timeout:g} s"
    gone = [f"{label} on {worker(address)}" for label, address in late if address not in present]
    silent = [f"{label} on {worker(address)}" for label, address in late if address in present]
    unanswered = sorted({address for _, address in late if address in present}) if not early else []
    for address in unanswered:
        note_unanswered(address)  # the next placements go elsewhere while they can
    said = []
    if gone:
        said.append(f"{', '.join(gone)}: the worker left the cluster (killed or crashed)")
    if silent and early:
        said.append(f"{', '.join(silent)}: not created yet (given up with the rest)")
    elif silent:
        said.append(f"{', '.join(silent)}: the worker did not answer (it is stopped, e.g. by SIGSTOP, or too busy)")
    error = PlacementError(
        f"{counted(len(late), what)} not created {within}: {'; '.join(said)}; resume or restart "
        "the worker, or place the pool with workers= that leaves it out"
    )
    error.silent = tuple(unanswered)
    raise error


def place_on_the_rest(
    client: Any, attempt: Callable[[float], A], chosen: Callable[[], set[str]], what: str, timeout: float
) -> A:
    """``attempt(bound)``, a placement that waits at most ``bound`` seconds for its actors and
    releases what it made when it fails, within ``timeout`` in all; tried again, on the workers
    that are left, as long as each try failed because workers it had chosen (``chosen()``, read
    after the failure) left the cluster meanwhile (killed or crashed while placed), or did not
    answer (stopped, e.g. by SIGSTOP, or hung: :func:`wait_created` notes them, and the next try
    passes them over while another candidate remains), and time is left: kills that come in
    waves cost a try each, not the placement. So the first try waits a quarter of ``timeout``
    (at least :data:`_TRY_AT_LEAST` seconds), and each later one what is left of it. When none
    is left that the placement may use (``workers=`` named only those), the next try waits for
    one, up to :data:`_COME_BACK` seconds: a nanny restarts a killed worker, under its name,
    within seconds. A failure for another cause, or past ``timeout``, is raised, with a note
    naming the workers that left."""
    deadline = time.monotonic() + timeout
    bound = first = min(timeout, max(_TRY_AT_LEAST, timeout / 4))
    gone: list[str] = []  # every worker that left during the tries, in order
    tries = 0
    back_by = math.inf
    while True:
        tries += 1
        try:
            return attempt(bound)
        except Exception as e:
            if tries > 1 and _no_worker_left(e):
                back_by = min(back_by, time.monotonic() + _COME_BACK)
                if time.monotonic() < min(back_by, deadline):
                    time.sleep(0.5)  # the workers it may use all left: one may come back
                    continue
                e.add_note(
                    f"zdq: workers {', '.join(gone) or 'it had chosen'} left the cluster or did not answer while "
                    f"{what} were placed, and none that they may use came back within {_COME_BACK:g} s"
                )
                raise
            back_by = math.inf
            # Dask says "Worker holding Actor was lost" before its scheduler may have dropped
            # the worker: only then is it waited for, a few seconds.
            left = workers_left(client, chosen(), wait=3.0 if "lost" in str(e).lower() else 0.0)
            silent = list(getattr(e, "silent", ()))
            rest = deadline - time.monotonic()
            if (not left and not silent) or rest <= 0:
                if gone or left:
                    e.add_note(
                        f"zdq: workers {', '.join(dict.fromkeys(gone + left))} left the cluster while {what} "
                        f"were placed ({tries} tries)"
                    )
                if silent and tries > 1:
                    e.add_note(
                        f"zdq: a first try waited {first:g} s; {', '.join(silent)} did not answer the last, "
                        f"which waited the rest of placement-timeout ({timeout:g} s in all)"
                    )
                raise
            gone.extend(left)
            logger.warning(
                "placing %s: %s (%s); placing them again on the others",
                what,
                f"worker {', '.join(left)} left the cluster meanwhile" if left
                else f"worker {', '.join(silent)} did not answer within {bound:g} s",
                e,
            )
            bound = rest


def _no_worker_left(error: BaseException) -> bool:
    """Whether a placement failed for want of any worker it may use (see ``_actor.pick_worker``)."""
    return isinstance(error, PlacementError) and any(s in str(error) for s in NO_WORKER)


def answers_within(
    client: Any, calls: dict[K, tuple[Any, str]], timeout: float | None
) -> tuple[dict[K, Any], dict[K, BaseException], set[K], set[K]]:
    """Wait for the actor calls ``calls`` (key -> (future, the actor's worker address)), all
    within ``timeout`` seconds (``None``: no bound). Returns ``(answers, errors, gone, silent)``:
    what each answered, what each raised, the calls whose worker left the cluster meanwhile, and
    those still unanswered at the end. A call to an actor whose worker was killed may never settle
    (Dask's actor calls are not failed when their worker leaves): the scheduler is asked, between
    steps of a second, which of the workers waited on left, and those calls are given up on at
    once rather than at the bound. An answer already in is taken however little time is left (a
    Dask actor future asked with ``timeout=0`` raises even when it holds its answer)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = dict(calls)
    answers: dict[K, Any] = {}
    errors: dict[K, BaseException] = {}
    gone: set[K] = set()
    while pending:
        now = time.monotonic()
        step_end = now + _LOOK_FOR_LEFT_EVERY if deadline is None else min(deadline, now + _LOOK_FOR_LEFT_EVERY)
        for key, (call, _) in list(pending.items()):
            left = max(0.0, step_end - time.monotonic())
            try:
                answers[key] = call.result() if call.done() else call.result(timeout=left)
            except TimeoutError:
                if not call.done():
                    continue  # not yet: waited for in the next step
                # Done now: its answer came as the wait gave up (reviewer 12 saw a consumer's
                # "started" reported as "timed out"), or the actor's own answer is a TimeoutError.
                try:
                    answers[key] = call.result()
                except Exception as e:  # noqa: BLE001 - the caller says what each raised
                    errors[key] = e
            except Exception as e:  # noqa: BLE001 - the caller says what each raised
                errors[key] = e
            del pending[key]
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        present = _present(client)
        if present is not None:
            for key, (call, worker) in list(pending.items()):
                if _left(worker, present) and not call.done():
                    gone.add(key)
                    del pending[key]
    return answers, errors, gone, set(pending)


class NoAnswer(TimeoutError):
    """:func:`result_in_steps` had no answer within its bound (not a TimeoutError the call
    itself answered)."""


def result_in_steps(call: Any, bound: float, meanwhile: Callable[[], object], step: float = 0.5) -> Any:
    """``call.result()`` (a Dask or actor future) within ``bound`` seconds, calling ``meanwhile()``
    between steps of ``step``: a supervisor waiting on one actor (a stopped worker costs it the
    whole bound) still does what must not wait, such as telling the queues lost meanwhile.
    :class:`NoAnswer` at the bound. An answer in by then is taken however little time is left
    (a Dask actor future asked with ``timeout=0`` raises even when it holds its answer), and a
    TimeoutError that is the call's own answer is raised as it is. A Dask future is waited for
    without its ``result(timeout=)`` (see :func:`dask_result`)."""
    deadline = time.monotonic() + bound
    dask = isinstance(call, distributed.Future)
    while True:
        if call.done():
            return dask_result(call, max(step, deadline - time.monotonic())) if dask else call.result()
        left = deadline - time.monotonic()
        if left <= 0:
            raise NoAnswer(f"no answer within {bound:g} s")
        try:
            if dask:
                distributed.wait([call], timeout=min(step, left))  # its state only: nothing to cancel
                continue
            return call.result(timeout=min(step, left))
        except TimeoutError:
            if call.done():
                if dask:
                    continue
                return call.result()  # answered meanwhile, or its answer is a TimeoutError
        meanwhile()


def dask_result(fut: distributed.Future[Any], timeout: float) -> Any:
    """``fut.result()`` within ``timeout`` seconds (TimeoutError past it), never through
    ``fut.result(timeout=)``. Dask's client shares one gather among the calls that wait at once
    (``Client._gather_future``, from any thread: the user's too); a ``result(timeout=)`` that
    times out cancels that shared gather, so another thread's ``result()`` of another future
    failed with ``UnboundLocalError`` (``distributed.utils.sync`` lets ``CancelledError``
    through), and a gather cancelled while it queued for its turn was kept by the client and
    failed every later one (distributed 2026.8). Placement and recovery waited so from several
    threads at once: under kills on a large cluster, durable queues were given up as
    unplaceable, and the user's client was broken. Here the future's state is waited for, and
    its value gathered by :func:`gather_actors`, whose bound never cancels a gather."""
    deadline = time.monotonic() + timeout
    if not fut.done():
        distributed.wait([fut], timeout=max(0.0, timeout))  # TimeoutError: not done
    if fut.status != "finished":
        return fut.result()  # its error, or its cancellation, raised from its state: no gather
    return gather_actors(fut.client, [fut], max(0.0, deadline - time.monotonic()))[0]


def _present(client: Any) -> set[str] | None:
    """The scheduler's workers now (None: it could not be asked)."""
    try:
        return set(scheduler_workers(client))
    except Exception:  # noqa: BLE001 - the caller says what is known
        return None


def _left(address: str, present: set[str]) -> bool:
    """Whether the worker ``address``, chosen for an actor, is no longer the scheduler's."""
    return address not in ("", "?") and address not in present


def workers_left(client: Any, chosen: set[str], wait: float) -> list[str]:
    """The workers of ``chosen`` (picked for a placement) that the scheduler no longer lists:
    gone while their actors were placed. Dask can report an actor's worker lost before its
    scheduler has dropped that worker, so the scheduler is asked again for up to ``wait`` seconds
    while none has left. [] when the scheduler cannot be asked (nothing to place again on)."""
    chosen = {address for address in chosen if address not in ("", "?")}
    if not chosen:
        return []
    deadline = time.monotonic() + wait
    while True:
        present = _present(client)
        if present is None:
            return []
        left = sorted(chosen - present)
        if left or time.monotonic() >= deadline:
            return left
        time.sleep(0.25)


def gather_actors(client: Any, futures: list[Any], timeout: float) -> list[Any]:
    """The actor proxies of ``futures`` (created: waited for by the caller), fetched in one round
    trip for all, where ``fut.result()`` each took one per actor, one after the other. Bounded:
    a worker stopped meanwhile raises TimeoutError after ``timeout`` seconds; the gather itself
    is left to end (it may be shared with other waits of the client: see :func:`dask_result`)."""
    if not futures:
        return []
    return list(client.sync(_gather_within, client, list(futures), timeout))


async def _gather_within(client: Any, futures: list[Any], timeout: float) -> list[Any]:
    """The client's gather of ``futures``, waited for ``timeout`` seconds through a shield: the
    bound cancels this wait, never the gather, which other waits may have joined."""
    gathering = asyncio.ensure_future(client._gather(futures))
    gathering.add_done_callback(_retrieved)  # an end after the bound is nobody's to read
    try:
        return list(await asyncio.wait_for(asyncio.shield(gathering), timeout))
    except asyncio.CancelledError:
        if gathering.cancelled():  # another wait of the client cancelled the gather this one joined
            raise TimeoutError("Dask's gather of the actors was cancelled by another wait of the client") from None
        raise


def _retrieved(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def placed_reports(client: Any, futures: list[Any], timeout: float) -> dict[str, Any]:
    """What the actors of ``futures`` (created) told the scheduler from their constructors
    (:func:`zdq._actor.tell_placed`), by future key, read in one round trip for all. An actor
    whose report is not there (the scheduler's bounded log rolled over) is left out: the caller
    asks it. Bounded by ``timeout`` (TimeoutError)."""
    if not futures:
        return {}
    events = client.sync(client.scheduler.events, topic=PLACED_TOPIC, callback_timeout=timeout)
    wanted = {str(fut.key) for fut in futures}
    return {msg["key"]: msg["what"] for _, msg in events if isinstance(msg, dict) and msg.get("key") in wanted}


def stop_created(
    client: Any, futures: list[Any], what: str, stop: Callable[[Any], Any] = lambda actor: actor.stop()
) -> None:
    """A placement whose actors start (or open) in their constructors failed after some were
    created: stop those now (released only, each would stop at its next heartbeat, and might take
    a chunk or hold its port meanwhile). Those not created yet are not waited for (the failure is
    said within its bound): released with the placement, each stops by itself once made, as one
    that cannot be stopped now does. Bounded. ``what`` names them in the log ("consumer");
    ``stop(actor)`` is the call that stops one."""
    created = [fut for fut in futures if fut.status == "finished"]
    actors: list[Any] = []
    try:
        actors = gather_actors(client, created, _STOP_CREATED_WAIT)
        calls = [stop(actor) for actor in actors]
        deadline = time.monotonic() + _STOP_CREATED_WAIT
        for call in calls:
            call.result(timeout=max(0.0, deadline - time.monotonic()))
    except Exception as e:  # noqa: BLE001 - its worker is gone or stuck: it stops by itself
        logger.debug("stopping the %ss of a failed placement failed: %s", what, e)
    finally:
        for actor in actors:  # each proxy holds its actor's key (see release_future)
            release_future(None, actor)


def release_future(fut: Any, actor: Any = None) -> None:
    """Release a Dask future (and the handle of its ``actor``), whatever state its worker is in.

    A Dask ``Actor`` proxy made on the client holds a future of its own key (``_future``): the
    scheduler keeps the actor until that one is released too. Left to the proxy's collection, the
    actor stayed on the scheduler and its worker for as long as the proxy lived in some reference
    cycle (seconds to a minute after ``close()``), so it is released here with the slot's.

    An actor future whose constructor still runs (a placement failed or interrupted) is released
    once it is done, by :data:`_LATE`: released before, Dask's scheduler goes on listing the actor
    on its worker for good (``WorkerState.actors``, distributed 2026.8), though the worker holds
    nothing. Made meanwhile, the actor stops by itself once released (``liveness_probe``).
    """
    for handle in (fut, getattr(actor, "_future", None)):
        if handle is None:
            continue
        if handle is fut and isinstance(fut, distributed.Future) and not fut.done():
            _LATE.add(fut)
        else:
            _release_now(handle)


def _release_now(handle: Any) -> None:
    try:
        handle.release()
    except Exception as e:  # noqa: BLE001 - its client may be closing: nothing is left to release
        logger.debug("releasing %s failed: %s", getattr(handle, "key", handle), e)


class _LateReleases:
    """Actor futures to release once done (see :func:`release_future`), each within
    :data:`_RELEASE_LATE_WITHIN` seconds at most, by a thread that runs while some wait."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: list[tuple[Any, float]] = []
        self._thread: threading.Thread | None = None

    def add(self, fut: Any) -> None:
        with self._lock:
            self._waiting.append((fut, time.monotonic() + _RELEASE_LATE_WITHIN))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="zdq-late-releases", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(_RELEASE_LATE_EVERY)
            with self._lock:
                now = time.monotonic()
                due = [fut for fut, by in self._waiting if fut.done() or now >= by]
                self._waiting = [(fut, by) for fut, by in self._waiting if not (fut.done() or now >= by)]
                last = not self._waiting
                if last:
                    self._thread = None  # an add() from now on starts another
            for fut in due:
                _release_now(fut)
            if last:
                return


_RELEASE_LATE_WITHIN = 60.0
_RELEASE_LATE_EVERY = 0.25
_LATE = _LateReleases()


class ActorSlots(Generic[A]):
    """``n`` slots, each holding the Dask future of an actor and the actor (or ``None``).

    One lock guards every slot and the closed flag: the supervisor's replacement and the user's
    ``close()`` never interleave half-way.
    """

    def __init__(self, n: int) -> None:
        self._lock = threading.Lock()
        self._futures: list[Any] = [None] * n
        self._actors: list[A | None] = [None] * n
        self._closed = False

    def __len__(self) -> int:
        return len(self._futures)

    @property
    def closed(self) -> bool:
        return self._closed

    def adopt(self, i: int, fut: Any, actor: A) -> Any:
        """Put ``actor`` (placed by ``fut``) in slot ``i``; return the future it replaces.

        Raises
        ------
        SlotsClosed
            The slots were closed meanwhile (a late recovery): the caller releases what it placed.
        """
        with self._lock:
            if self._closed:
                raise SlotsClosed(f"slot {i} was closed while its actor was being placed")
            old = self._futures[i]
            self._futures[i], self._actors[i] = fut, actor
            return old

    def actor(self, i: int) -> A | None:
        with self._lock:
            return self._actors[i]

    def future(self, i: int) -> Any:
        with self._lock:
            return self._futures[i]

    def actors(self) -> list[A | None]:
        with self._lock:
            return list(self._actors)

    def futures(self) -> list[Any]:
        with self._lock:
            return list(self._futures)

    def placed(self) -> bool:
        """Whether every slot holds an actor."""
        with self._lock:
            return not self._closed and all(a is not None for a in self._actors)

    def take_all(self) -> list[tuple[Any, A | None]]:
        """Close the slots and hand back every slot's ``(future, actor)`` (``None`` where empty)
        for the caller to stop and release. Idempotent (the second call gets only ``None``)."""
        with self._lock:
            self._closed = True
            taken = list(zip(self._futures, self._actors))
            n = len(self._futures)
            self._futures, self._actors = [None] * n, [None] * n
        return taken


    def close(
        self, names: list[str], what: str, timeout: float, client: Any, workers: list[str], skip: Container[str] = ()
    ) -> None:
        """Close the slots, stop every actor (all asked at once, the answers awaited together for
        at most ``timeout`` seconds, through :func:`answers_within`: a stop sent to a worker that
        left is given up on at once) and release it. ``what`` names an actor in the logs
        ("consumer"), ``workers`` each slot's worker. The same for both pools: a worker already
        gone only makes its stop fail quietly. ``skip``: names released without a stop (told
        already, their worker did not answer: a second call would only fail there later)."""
        taken = self.take_all()
        stops: dict[str, tuple[Any, str]] = {}
        for i, (name, (_, actor)) in enumerate(zip(names, taken)):
            if actor is None or name in skip:
                continue
            proxy: Any = actor  # a Dask actor proxy: its methods are the actor's
            try:
                stops[name] = (proxy.stop(), workers[i] if i < len(workers) else "")
            except Exception as e:  # the worker may be gone already
                logger.debug("stopping %s %s failed: %s", what, name, e)
        if stops:
            _, errors, gone, silent = answers_within(client, stops, timeout)
            for name, error in errors.items():
                logger.debug("stopping %s %s failed: %s", what, name, error)
            for name in sorted(gone):
                logger.debug("stopping %s %s: its worker left", what, name)
            for name in sorted(silent):
                # Said where it shows: a close that waited its whole bound for a stopped worker
                # was silent about why (reviewer 16).
                say_unanswered(what, name, stops[name][1], timeout)
        for fut, actor in taken:
            release_future(fut, actor)


def say_unanswered(what: str, name: str, worker: str, timeout: float) -> None:
    """Warn that ``what`` ``name`` on ``worker`` did not answer its stop within ``timeout``."""
    logger.warning(
        "close: %s %s on %s did not answer its stop within %g s (its worker is stopped, or too busy); "
        "released without its answer: it stops once its worker runs again and Dask drops its actor (a consumer "
        "may start more tasks of the chunk it held until then: they run twice, as at least once allows)",
        what, name, worker or "its worker", timeout,
    )


class SlotsClosed(Exception):
    """Internal: a slot was written after its pool closed (never leaves this package)."""


def client_closed(client: Any) -> bool:
    """Whether the Dask ``client`` a pool placed its actors with was closed (or is closing): the
    one rule by which both pools' supervision ends (see :class:`Supervisor`)."""
    return client.status in ("closing", "closed")


class Supervisor:
    """A daemon thread calling ``pool.supervise_once()`` every ``interval`` seconds until stopped,
    the pool closed or collected, its Dask ``client`` closed, or the interpreter exiting.

    It holds the pool weakly (a pool its program dropped without closing is still collected), and
    an error of one round is logged and the next round runs: supervision never dies of a fault.

    The client is judged here, once for both pools, before each round: closed (a program that
    closes its client and never its pools, as daskqueue programs do), supervision ends, after
    ``pool.<on_client_closed>()`` if given (the queue pool fails its pending futures there);
    not running yet (reconnecting to its scheduler), the round waits. A round never has to ask.
    """

    def __init__(
        self,
        pool: Any,
        name: str,
        interval: float = 0.25,
        *,
        client: Any,
        method: str = "supervise_once",
        on_client_closed: str | None = None,
    ) -> None:
        self._ref = weakref.ref(pool)
        self._name = name
        self._interval = interval
        self._client = client
        self._method = method
        self._on_client_closed = on_client_closed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stopping(self) -> bool:
        """Whether supervision is over (stopped, or the interpreter exiting): a round in progress
        gives up what it would start."""
        return self._stop.is_set() or _EXITING.is_set()

    def start(self) -> None:
        if self._thread is not None or self.stopping:
            return
        # The thread runs in a copy of the starting thread's context: a pool's own Dask client,
        # current there (see zdq.client.asynchronous), stays current for the actors placed again.
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,), name=self._name, daemon=True)
        with _running_lock:
            _running.add(self)
            # Last registered, first run: before whatever Dask registered since (its clusters'
            # and finalizers' exit hooks), whose teardown the supervisors must not fight.
            atexit.unregister(_at_exit)
            atexit.register(_at_exit)
        self._thread.start()

    def stop(self, join: float = 0.0) -> None:
        """Stop; wait up to ``join`` seconds for a round in progress (it never writes into a
        closed pool: the slots refuse it)."""
        self._stop.set()
        thread = self._thread
        if join and thread is not None and thread is not threading.current_thread():
            thread.join(join)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self._interval):
                if _EXITING.is_set() or self._ref() is None:
                    return  # exiting, or the pool was collected (dropped without close())
                if client_closed(self._client):
                    self._client_closed()
                    return
                if self._client.status != "running":
                    continue  # reconnecting to its scheduler: nothing can be placed meanwhile
                pool = self._ref()
                if pool is None:
                    return
                try:
                    getattr(pool, self._method)()
                except Exception:  # noqa: BLE001 - one round's fault never ends supervision
                    if not self.stopping:
                        logger.exception("%s: a supervision round failed (the next one runs)", self._name)
                del pool
        finally:
            with _running_lock:
                _running.discard(self)

    def _client_closed(self) -> None:
        """The pool's client was closed under it: supervision ends (stopping first, so that the
        pool's own hook sees it over), after the pool's hook if it has one."""
        self._stop.set()
        logger.debug("%s: the Dask client was closed: supervision ends", self._name)
        pool = self._ref()
        if pool is None or self._on_client_closed is None:
            return
        try:
            getattr(pool, self._on_client_closed)()
        except Exception:  # noqa: BLE001 - said, and supervision ends all the same
            logger.exception("%s: ending the pool after its Dask client closed failed", self._name)


def call_all(calls: list[tuple[str, Callable[[], Any]]], timeout: float, what: str) -> list[tuple[str, Any]]:
    """Start every call, then wait for each (``timeout`` each): ``(name, result or exception)``."""
    started: list[tuple[str, Any]] = []
    for name, call in calls:
        try:
            started.append((name, call()))
        except Exception as e:  # noqa: BLE001 - its worker is gone
            started.append((name, e))
    out: list[tuple[str, Any]] = []
    for name, fut in started:
        if isinstance(fut, BaseException):
            out.append((name, fut))
            continue
        try:
            out.append((name, fut.result(timeout=timeout)))
        except Exception as e:  # noqa: BLE001 - said by the caller, per name
            logger.debug("%s on %s failed: %s", what, name, e)
            out.append((name, e))
    return out

"""Results and states by task id, from any process of the cluster: Celery's ``AsyncResult(id)``,
RQ's ``Job.fetch(id)``.

A web request submits and keeps ``future.key`` (task ids never repeat across pools); another
request, in another process, asks::

    zdq.state("mails", key)              # "pending", "started", "done", "failed", ...
    zdq.result("mails", key, timeout=5)  # the value, or the task's exception raised

The pool is found by its name in the cluster's registry (:mod:`zdq.client.registry`: its owner
publishes it while it lives); each of its queues' brokers is asked where the task stands
(:mod:`zdq.broker.task_state`, run on the broker's worker as ``zdq dead-letters`` is), and the
results, sealed with the pool's payload key, are unsealed and read here: the broker never reads
them.

A task's result is there while its chunk's results wait for their driver, and, for a pool made
with ``result_ttl=``, for that long after the driver took them (at most ``result_bytes`` per queue,
the oldest dropped first; durable queues keep them on disk). Without ``result_ttl`` a result the
driver took is gone from the queue: its state is then ``"unknown"``.

States: ``pending`` (queued), ``started`` (its chunk is with a consumer), ``done``, ``failed``,
``cancelled``, ``expired`` (its ``expires=`` passed before it ran), ``unknown``. A task cancelled
before delivery is ``cancelled`` while the pool keeps results (``result_ttl``), ``unknown`` without.
A unique task's follower reads as the task it follows (its results are that task's).

Keys pass 2**53: a web app passes them as strings in JSON; a string of digits is taken here. A
process that cannot import the app's classes still reads a task's state (done or failed: the
results are read with stand-ins for the missing names); its value or exception is then the error
the driver's future gives: a :class:`~zdq.errors.RemoteTaskError` of the task's exception (a note
names what is missing), a :class:`~zdq.errors.SerializationError` for its value.

No state here: each call asks the registry and the brokers afresh.
"""

from __future__ import annotations

import math
import operator
import time
from typing import Any

from zdq.client import registry
from zdq.names import check_pool_name
from zdq.codec.results import error_to_exception, loads_results
from zdq.errors import (
    UnreadableResult,
    BrokerLost,
    DeadLettered,
    ProtocolError,
    TaskCancelled,
    TaskExpired,
    ZdqError,
    ZdqTimeoutError,
)

__all__ = ["STATES", "PoolNotFound", "outcome", "result", "state"]

#: What :func:`state` answers.
STATES = ("pending", "started", "done", "failed", "cancelled", "expired", "unknown")
#: States after which a task's state never changes (while its result is kept).
_FINAL = frozenset({"done", "failed", "cancelled", "expired"})
#: When several queues answer (a task is in one queue), the most advanced answer stands.
_RANK = {s: i for i, s in enumerate(("unknown", "pending", "started", "expired", "cancelled", "failed", "finished"))}
#: :func:`result` polls the brokers from this interval, doubling up to the last.
_FIRST_POLL, _LAST_POLL = 0.02, 0.5
#: :func:`result` without a timeout gives up on a task no queue has heard of after this (s): its
#: id is wrong, or its result was taken and not kept (``result_ttl``).
UNKNOWN_GRACE = 10.0
#: How long one round of questions to the brokers may take (s): at most this, and at most the
#: time left of the caller's timeout (but never less than :data:`MIN_ASK`).
ASK_TIMEOUT = 10.0
MIN_ASK = 1.0


class PoolNotFound(ZdqError, LookupError):
    """No live pool of that name is registered on the cluster."""


def state(pool_name: str, key: int, *, client: Any = None, dirpath: str | None = None) -> str:
    """Where task ``key`` (an int, or a string of its digits) of pool ``pool_name`` stands now: one
    of :data:`STATES`.

    ``"unknown"``: no queue of the pool holds the task, or its result (never submitted there, or
    its result was taken by its driver and not kept: see ``result_ttl``).

    Raises
    ------
    ValueError, TypeError
        ``key`` is negative, or a string of non-digits; ``pool_name`` cannot name a pool
        (:func:`zdq.names.check_pool_name`).
    PoolNotFound
        No live pool ``pool_name`` (with ``dirpath``, for a durable pool of several directories).
    ZdqTimeoutError
        A queue of the pool did not answer within 10 s (its worker is stopped or too busy), and
        no other holds the task.
    BrokerLost
        A queue of the pool is gone from its worker, and no other holds the task.
    ZdqError
        The task's results cannot be read in this process at all (not even which tasks failed).
    """
    return _Asker(pool_name, key, client, dirpath).once()[0]


def result(pool_name: str, key: int, timeout: float | None = None, *, client: Any = None, dirpath: str | None = None) -> Any:
    """The result of task ``key`` of pool ``pool_name``, waiting up to ``timeout`` seconds for it
    (``None``: as long as the task is pending or started; else a finite number, 0 or more), as
    ``future.result()`` gives it: its value, or its exception raised.

    Raises
    ------
    ZdqTimeoutError
        (a ``TimeoutError``) No result within ``timeout``; the message names the task's last state.
        Without a timeout (or with one longer than :data:`UNKNOWN_GRACE`), a task that no queue
        holds for that long; a queue that did not answer is named.
    ValueError
        ``timeout`` is negative, not finite, or not a number; ``key`` is negative, or a string of
        non-digits; ``pool_name`` cannot name a pool (:func:`zdq.names.check_pool_name`).
    TaskCancelled, DeadLettered, ZdqError
        The task was cancelled, dead-lettered (its results gone), or expired.
    PoolNotFound
        No live pool ``pool_name``.
    BaseException
        The task's own exception, as the task raised it.
    """
    now_state, value, error, why = outcome(pool_name, key, timeout, client=client, dirpath=dirpath)
    if now_state in _FINAL:
        if error is not None:
            raise error
        return value
    if now_state == "unknown" and why != "unknown":  # some queue did not answer: that is the cause
        raise ZdqTimeoutError(f"task {key} of pool {pool_name}: no result; {why}")
    if timeout is None or (now_state == "unknown" and timeout > UNKNOWN_GRACE):
        raise ZdqTimeoutError(
            f"task {key} of pool {pool_name}: no queue of the pool has held it for {UNKNOWN_GRACE:g} s (a wrong "
            "key; a task cancelled before its driver sent it; or its result was taken by its driver and not "
            "kept: give the pool result_ttl=)"
        )
    raise ZdqTimeoutError(f"task {key} of pool {pool_name}: no result within {timeout:g} s; its last state: {why}")


def outcome(
    pool_name: str, key: int, timeout: float | None = 0.0, *, client: Any = None, dirpath: str | None = None
) -> tuple[str, Any, BaseException | None, str]:
    """``(state, value, exception, why)`` of task ``key``, once it is final (done, failed,
    cancelled, expired) or ``timeout`` seconds have passed (``0``: as it is now; ``None``: while it
    is pending or started, and :data:`UNKNOWN_GRACE` seconds while no queue holds it). ``why``
    names the state, and why the queues could not say more. Raises nothing for the task's outcome
    (:func:`result` does); :class:`PoolNotFound` if the pool is not live."""
    timeout = _timeout(timeout)
    asker = _Asker(pool_name, key, client, dirpath)
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    pause = _FIRST_POLL
    while True:
        bound = ASK_TIMEOUT if deadline is None else min(ASK_TIMEOUT, max(MIN_ASK, deadline - time.monotonic()))
        try:
            now_state, value, error = asker.once(bound)
            why = now_state
        except (BrokerLost, ZdqTimeoutError) as e:  # a queue being placed again, or stalled: asked again
            now_state, value, error, why = "unknown", None, None, f"unknown ({e})"
        now = time.monotonic()
        if (
            now_state in _FINAL
            or (deadline is not None and now >= deadline)
            or (now_state == "unknown" and now - start >= UNKNOWN_GRACE and (deadline is None or why == "unknown"))
        ):
            return now_state, value, error, why
        left = pause if deadline is None else min(pause, deadline - now)
        time.sleep(max(0.0, left))
        pause = min(pause * 2, _LAST_POLL)


def _timeout(timeout: Any) -> float | None:
    """``timeout`` checked: None, or a finite number of seconds, 0 or more."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout < 0:
        raise ValueError(f"timeout must be None or a finite number of seconds >= 0, got {timeout!r:.80}")
    return float(timeout)


#: Task keys travel as unsigned 64-bit integers: none is this large.
_KEYS = 1 << 64


def task_key(key: Any) -> int:
    """A task's key as an int: ``future.key``, a numpy integer, or a string of digits (as a web
    route receives it; keys pass 2**53, so JSON must carry them as strings). A negative key, or
    one of more than 64 bits, is refused: no task has one."""
    if isinstance(key, str):
        text = key.strip()
        if not (text.isascii() and text.isdigit()):
            raise ValueError(f"a task's key is an int (future.key) or a string of its digits, got {key!r:.80}")
        value = int(text)
    elif isinstance(key, bool):
        raise TypeError(f"a task's key is an int (future.key), got {key!r}")
    else:
        try:
            value = operator.index(key)
        except TypeError:
            raise TypeError(f"a task's key is an int (future.key), got {key!r:.80}") from None
    if value < 0:
        raise ValueError(f"a task's key is never negative (future.key is 0 or more), got key {value}")
    if value >= _KEYS:
        raise ValueError(f"a task's key fits in 64 bits (future.key is below 2**64), got key {value}")
    return value


class _Asker:
    """One task of one pool: its pool's record, and the questions to its queues' brokers."""

    def __init__(self, pool_name: str, key: Any, client: Any, dirpath: str | None) -> None:
        key = task_key(key)
        check_pool_name(pool_name, "pool_name")  # a name no pool can have is not looked up
        if client is None:
            from distributed import default_client

            client = default_client()
        if getattr(client, "asynchronous", False):
            raise TypeError(
                "zdq.result and zdq.state take a synchronous Dask client (they wait): call them off the event loop "
                "(await asyncio.to_thread(zdq.result, ...)) with Client(address) made there"
            )
        self.client = client
        self.pool_name = pool_name
        self.key = key
        self.dirpath = dirpath
        self.record = _find_pool(client, pool_name, dirpath)

    def once(self, bound: float | None = None) -> tuple[str, Any, BaseException | None]:
        """``(state, value, exception)`` as the brokers answer now (within ``bound`` seconds,
        :data:`ASK_TIMEOUT` by default)."""
        try:
            answers = _ask(self.client, self.record, self.key, ASK_TIMEOUT if bound is None else bound)
        except BrokerLost:
            self.record = _find_pool(self.client, self.pool_name, self.dirpath)  # its queues may have moved
            raise
        found, payload, detail = max(answers, key=lambda a: _RANK.get(a[0], 0))
        if found == "finished":
            return _read(self.record, self.key, payload, int(detail) if detail else self.key)
        if found == "failed":
            return found, None, DeadLettered(f"task {self.key} of pool {self.pool_name} was dead-lettered: {detail}")
        if found == "cancelled":
            return found, None, TaskCancelled(f"task {self.key} of pool {self.pool_name} was cancelled")
        if found == "expired":
            return found, None, TaskExpired(f"task {self.key} of pool {self.pool_name} expired before it ran {detail}".rstrip())
        return found, None, None


def _find_pool(client: Any, name: str, dirpath: str | None) -> registry.PoolRecord:
    """The live pool ``name``'s record; a durable pool's without ``dirpath`` if it is the only
    pool of that name."""
    record = registry.lookup(client, name, dirpath)
    if record is not None and record.name != name:
        record = None  # a pool named "a@b", asked for as "a"
    if record is None and dirpath is None:
        durable = _durable_named(client, name)
        if len(durable) > 1:
            raise PoolNotFound(
                f"several durable pools are named {name!r} (in {', '.join(r.dirpath or '' for r in durable)}): "
                "pass dirpath= to say which"
            )
        if durable:
            record = durable[0]
    if record is None:
        raise PoolNotFound(
            f"no live pool named {name!r} on this cluster: its QueuePool is not running (or was given another "
            "name); results by id are asked of a pool's queues while its owner runs"
        )
    return record


def _durable_named(client: Any, name: str) -> list[registry.PoolRecord]:
    """The live durable pools named exactly ``name`` (the registry's keys are ``name@dirpath``: a
    pool named ``"a@b"`` shares the prefix of a durable pool ``"a"``, and is not one)."""
    prefix = registry.registry_key(name, "")
    found = []
    for k in client.list_datasets():
        if isinstance(k, str) and k.startswith(prefix):
            record = registry.lookup(client, name, k[len(prefix) :])
            if record is not None and record.name == name and record.dirpath is not None:
                found.append(record)
    return found


def _ask(client: Any, record: registry.PoolRecord, key: int, bound: float = ASK_TIMEOUT) -> list[tuple[str, bytes | None, str]]:
    """Every queue's answer about task ``key`` (one ``client.run`` per worker that holds some)."""
    by_worker: dict[str, list[str]] = {}
    for i, name in enumerate(record.queue_names):
        worker = record.workers[i] if i < len(record.workers) else ""
        by_worker.setdefault(worker, []).append(name)
    answers: list[tuple[str, bytes | None, str]] = []
    silent: list[str] = []
    stalled = 0  # of the silent: up to Dask, but no answer in time (a stopped or busy worker)
    try:
        alive: set[str] | None = set(client.ncores())  # a worker that left is not waited for
    except Exception:  # noqa: BLE001 - the scheduler did not say: each worker is asked all the same
        alive = None
    for worker, names in by_worker.items():
        if worker and alive is not None and worker not in alive:
            silent.append(f"{', '.join(names)} on {worker} (its worker has left the cluster)")
            continue
        try:
            out = client.run(
                _task_states, names, key, workers=[worker] if worker else None, on_error="return", callback_timeout=bound
            )
            got = out.get(worker) if worker else _merged(out)
        except Exception as e:  # noqa: BLE001 - its worker is gone, or too busy to answer: named below
            got = e
        if isinstance(got, TimeoutError) or type(got).__name__ == "TimeoutError":
            got = f"no answer within {bound:g} s: its worker is stopped or too busy"
            stalled += 1
        if isinstance(got, (BaseException, str)) or got is None:
            silent.append(f"{', '.join(names)} on {worker or 'an unknown worker'} ({got if isinstance(got, str) else repr(got):.200})")
            continue
        for name in names:
            answer = got[name]
            if answer is None:
                silent.append(f"{name} (no longer on worker {worker})")
            else:
                answers.append(answer)
    if silent and not any(a[0] != "unknown" for a in answers):
        # A stopped worker is not a lost queue (reviewer 27b): a timeout, unless one is gone.
        kind = ZdqTimeoutError if stalled == len(silent) else BrokerLost
        raise kind(f"pool {record.name}: queues gave no answer about task {key}: {'; '.join(silent)}")
    return answers or [("unknown", None, "")]


def _merged(per_worker: dict[str, Any]) -> dict[str, Any]:
    """The answers of every worker asked (where a queue's worker is not known): each queue's
    from the worker that holds it."""
    merged: dict[str, Any] = {}
    for answers in per_worker.values():
        if isinstance(answers, dict):
            for name, answer in answers.items():
                if answer is not None or name not in merged:
                    merged[name] = answer
    return merged


def _task_states(names: list[str], key: int) -> dict[str, Any]:
    """On a worker: each named broker's answer about task ``key`` (None: not on this worker)."""
    from zdq.observe.feed import local_broker

    out: dict[str, Any] = {}
    for name in names:
        broker = local_broker(name)
        out[name] = None if broker is None else broker.task_state(key)
    return out


def _read(
    record: registry.PoolRecord, key: int, payload: bytes | None, holder: int
) -> tuple[str, Any, BaseException | None]:
    """The outcome of task ``key`` in its chunk's sealed results; ``holder`` is the task whose
    results they are: ``key`` itself, or the unique task ``key`` followed. Read as the driver reads
    them (``lenient``): an outcome that holds a name this process cannot import is the error the
    driver's future would raise (a :class:`RemoteTaskError` of the task's exception, noting the
    name; a :class:`SerializationError` for a value), and costs no other task its outcome."""
    try:
        base, values, errors = loads_results(payload, record.payload_key, lenient=True)
    except ProtocolError:  # forged, or not results: said as it is
        raise
    except Exception as e:  # noqa: BLE001 - they do not load here even with stand-ins: said so
        raise ZdqError(
            f"task {key} of pool {record.name}: its results cannot be read in this process ({type(e).__name__}: "
            f"{e}): ask from a process that can import the app's code"
        ) from e
    index = holder - base
    if not 0 <= index < len(values):
        return "unknown", None, None
    info = errors.get(index)
    if info is None:
        return "done", values[index], None
    exc = error_to_exception(info)
    if isinstance(exc, UnreadableResult):  # it succeeded; its value does not load here
        return "done", None, exc
    return ("cancelled" if isinstance(exc, TaskCancelled) else "failed"), None, exc

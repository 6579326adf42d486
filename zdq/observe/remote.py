"""Live pools seen and steered from any process of the cluster: what ``zdq status``, ``zdq purge``,
``zdq dead-letters``, ``zdq schedules`` and ``zdq rate-limit`` call.

The cluster is reached as a Dask client reaches it (``Client(address)``, with the security settings
of ``dask.config``). Figures come from the scheduler's monitor (:mod:`zdq.observe.monitor`), one
RPC. Actions run on the worker that holds each queue (``client.run``), on the Broker actor found
there by name: the same methods as ``QueuePool.dead_letters()`` and the rest, without having to be
the pool's owner.
"""

from __future__ import annotations

from typing import Any

from zdq.errors import ZdqError

__all__ = ["ACTIONS", "NoMonitor", "act", "check_address", "connect", "queues_of", "status"]

#: What :func:`act` may ask a broker, by name: the Broker actor method it calls.
ACTIONS = {
    "dead-letters": "dead_letters",
    "requeue-dead": "requeue_dead",
    "purge-dead": "purge_dead",
    "purge": "purge_ready",
    "schedules": "schedules",
    "cancel-schedule": "cancel_schedule",
    "rate-limit": "set_rate_limit",
}
#: Actions that change nothing (an unanswered one leaves nothing half done).
_READ_ONLY = frozenset({"dead-letters", "schedules"})


class NoMonitor(ZdqError, LookupError):
    """The cluster's scheduler runs no zdq monitor: no pool was placed on it (or zdq is not
    installed where the scheduler runs)."""


def check_address(address: str) -> str:
    """``address`` as a Dask client would use it, checked before any connection is tried: a
    ``ValueError`` that names what is wrong (Dask would fail deep in its comm layer, then leave a
    client that takes seconds to give up at exit)."""
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(address if "://" in address else f"tcp://{address}", strict=True)
        if scheme not in ("tcp", "tls"):
            raise ValueError(f"the scheme {scheme}:// is not one a scheduler is reached by here (tcp:// or tls://)")
        parse_host_port(location)  # a port is required
    except ValueError as e:
        raise ValueError(f"{address!r} is not a scheduler address like tcp://host:8786: {e}") from None
    return address


def connect(address: str, timeout: float) -> Any:
    """A Dask client of the scheduler at ``address``; ``OSError`` (with the address, and what
    answers there if it is not a scheduler) if it cannot be reached within ``timeout`` seconds,
    whatever listens there.

    Dask bounds the TCP connection by ``timeout`` but not the handshake after it, and a peer that
    is not Dask can make a ``Client`` fail in its comm layer (an HTTP server's or sshd's first bytes
    read as a frame's length: "Unable to allocate 3.07 EiB"), leaving a half-made client whose
    ``__del__`` then holds the process for 10 s. So the peer is first asked who it is
    (:func:`_identify`, one connection, every step bounded), and a client is made only of a
    scheduler that said so: on a thread of its own, given up on after the time left and a second.
    """
    import asyncio
    import threading
    import time
    import traceback

    from distributed import Client
    from distributed.security import Security

    if address.startswith("inproc://"):
        raise OSError(f"cannot reach a Dask scheduler at {address}: an inproc address works only inside its own process")
    try:
        check_address(address)
    except ValueError as e:
        raise OSError(f"cannot reach a Dask scheduler: {e}") from None
    security = Security()  # dask.config's distributed.comm.tls.* and require-encryption, as any client
    if address.startswith("tls://") and security.get_connection_args("client").get("ssl_context") is None:
        raise OSError(
            f"cannot reach a Dask scheduler at {address}: a tls:// address needs TLS settings in dask.config "
            "(distributed.comm.tls.ca-file, .client.cert, .client.key)"
        )
    deadline = time.monotonic() + timeout
    asyncio.run(_identify(address if "://" in address else f"tcp://{address}", timeout, security))
    made: list[Any] = []
    failed: list[BaseException] = []

    def make() -> None:
        try:
            made.append(Client(address, timeout=timeout, set_as_default=False, security=security))
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            # Its frames hold the half-made client: dropped here, so that its __del__ (which
            # may wait 10 s for a loop that never connected) runs on this daemon thread, not
            # at the process's exit.
            traceback.clear_frames(e.__traceback__)
            failed.append(e.with_traceback(None))

    thread = threading.Thread(target=make, name="zdq-cli-connect", daemon=True)
    thread.start()
    thread.join(max(deadline - time.monotonic(), 0.0) + 1.0)
    if made:
        return made[0]
    if failed:
        raise OSError(f"cannot reach a Dask scheduler at {address} within {timeout:g} s: {failed[0]}") from None
    raise OSError(
        f"no Dask scheduler answered at {address} within {timeout:g} s (something accepts connections "
        "there but does not speak Dask's protocol: a dashboard's HTTP port?)"
    )


async def _identify(address: str, timeout: float, security: Any) -> None:
    """Connect to ``address`` as Dask's comm layer does, shake hands and ask the peer's identity,
    each step within what is left of ``timeout``; ``OSError`` saying which step failed unless the
    peer is a Dask scheduler. A connection refused is tried again until the time is up, as Dask
    does (a scheduler may be starting)."""
    import asyncio

    from distributed.comm.addressing import parse_address
    from distributed.comm.core import FatalCommClosedError
    from distributed.comm.registry import get_backend

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    scheme, location = parse_address(address)
    connector = get_backend(scheme).get_connector()
    args = security.get_connection_args("client")
    comm: Any = None
    last = "the connection timed out"
    while comm is None:
        left = deadline - loop.time()
        if left <= 0:
            raise OSError(f"cannot reach a Dask scheduler at {address} within {timeout:g} s: {last}")
        try:
            comm = await _within(connector.connect(location, deserialize=False, **args), left)
        except FatalCommClosedError as e:  # TLS refused: trying again changes nothing
            raise OSError(f"cannot reach a Dask scheduler at {address}: {e or e.__cause__ or 'TLS failed'}") from None
        except (OSError, asyncio.TimeoutError) as e:
            last = str(e.__cause__ or e) or last  # the cause: Dask's text names its connector object
            await asyncio.sleep(min(0.1, max(deadline - loop.time(), 0.0)))
    not_dask = f"something at {address} answered, but not as a Dask scheduler"

    async def ask() -> Any:
        # The handshake of distributed.comm.core.connect (which Dask leaves unbounded), then
        # the question every Dask server answers: what it is.
        local = comm.handshake_info()
        await comm.write(local)
        remote = await comm.read()
        if not isinstance(remote, dict):
            raise TypeError("a handshake that is not Dask's")
        comm.local_info, comm.remote_info = {**local, "address": comm.local_address}, {**remote, "address": comm.peer_address}
        comm.handshake_options = comm.handshake_configuration(comm.local_info, comm.remote_info)
        await comm.write({"op": "identity", "reply": True})
        return await comm.read()

    try:
        identity = await _within(ask(), max(deadline - loop.time(), 0.0))
    except asyncio.TimeoutError:  # before OSError: TimeoutError is one
        raise OSError(
            f"no Dask scheduler answered at {address} within {timeout:g} s (something accepts connections "
            "there but does not speak Dask's protocol: a dashboard's HTTP port?)"
        ) from None
    except OSError:  # CommClosedError: the peer hung up
        raise OSError(f"{not_dask}: it closed the connection without Dask's handshake (another service on that port?)") from None
    except Exception:  # noqa: BLE001 - its bytes read as Dask's frames: any decoding error, a MemoryError
        raise OSError(
            f"{not_dask}: what it sends is not Dask's protocol (an HTTP server, ssh, or another service on that port?)"
        ) from None
    finally:
        comm.abort()
    kind = identity.get("type") if isinstance(identity, dict) else None
    if not (isinstance(kind, str) and kind.endswith("Scheduler")):
        what = f"a Dask {kind}" if isinstance(kind, str) and kind.isidentifier() else "not a scheduler"
        raise OSError(f"{not_dask}: it is {what} (give the address of the cluster's scheduler)")


async def _within(awaitable: Any, timeout: float) -> Any:
    """``asyncio.wait_for``, without losing a cancellation. Ctrl-C reaches a coroutine run by
    ``asyncio.run`` as a cancellation of its task, and in Python 3.11 ``wait_for`` swallows a
    cancellation that lands as what it awaits completes: the command then went on to its next
    wait, and a Ctrl-C while connecting to a silent peer was lost for the whole ``--timeout``."""
    import asyncio

    result = await asyncio.wait_for(awaitable, timeout)
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        if hasattr(result, "abort"):
            result.abort()  # a comm made as the cancellation came
        raise asyncio.CancelledError
    return result


def status(client: Any, timeout: float) -> dict[str, Any]:
    """The monitor's status: every live pool, its queues, consumers, totals and rates."""
    none = f"the scheduler at {client.scheduler.address} runs no zdq pool (no zdq monitor)"
    try:
        state = client.sync(_status, client, timeout)
    except (TimeoutError, OSError):
        raise
    except Exception as e:  # an unknown operation: some versions of Dask answer with an error
        if "zdq_status" in str(e):
            raise NoMonitor(none) from e
        raise
    if not isinstance(state, dict) or "pools" not in state:  # others answer nothing
        raise NoMonitor(none)
    _add_unreported(client, state, timeout)
    return state


#: What the commands say of a queue of a pool that the monitor has no recent report of.
UNREPORTED = (
    "not reached: its broker has sent no report lately (its worker is stopped or too busy, or the queue is "
    "being placed again); nothing was done there"
)


def _add_unreported(client: Any, state: dict[str, Any], timeout: float) -> None:
    """Add to each pool of ``state`` the queues its owner published (the pool's record, see
    :mod:`zdq.client.registry`) that the monitor has no recent report of, as ``"unreported"``:
    the monitor forgets a queue that stops reporting, and a command acting on what it lists
    would skip that queue without a word. A pool whose record cannot be read (or is one of two
    of that name) is left as the monitor sees it."""
    from zdq.client.registry import PoolRecord, records_named

    pools = state["pools"]
    if not pools:
        return
    try:
        keys = set(client.list_datasets(callback_timeout=timeout))
    except Exception:  # noqa: BLE001 - what the monitor says is still shown
        return
    for name, pool in pools.items():
        mine = records_named(name, keys)
        if len(mine) != 1:
            continue
        try:
            record = client.get_dataset(mine[0], default=None, callback_timeout=timeout)
        except Exception:  # noqa: BLE001 - the same
            continue
        if isinstance(record, PoolRecord):
            seen = {q["name"] for q in pool["queues"]}
            pool["unreported"] = [q for q in record.queue_names if q not in seen]


async def _status(client: Any, timeout: float) -> dict[str, Any] | None:
    import asyncio

    # Asked first: a scheduler without the handler logs a traceback for an unknown operation. A
    # lambda, so that it is pickled by value: the scheduler may not have zdq to import.
    has_monitor = lambda dask_scheduler: "zdq_status" in dask_scheduler.handlers  # noqa: E731
    if not await asyncio.wait_for(client.run_on_scheduler(has_monitor), timeout):
        return None
    return await asyncio.wait_for(client.scheduler.zdq_status(), timeout)


def queues_of(state: dict[str, Any], pool: str, queue: str | None = None) -> list[dict[str, Any]]:
    """The queues of ``pool`` (``queue`` alone if given) in a status, those without a recent
    report included as ``{"name": ..., "unreported": True}`` (:func:`act` answers for them that
    they were not reached); ``KeyError`` naming what is missing and what exists."""
    pools = state["pools"]
    if pool not in pools:
        live = ", ".join(sorted(pools)) or "none"
        raise KeyError(f"no live pool named {pool!r} on this cluster (live pools: {live})")
    from zdq.observe.views import natural

    unreported = [{"name": n, "unreported": True} for n in pools[pool].get("unreported", ())]
    queues = sorted([*pools[pool]["queues"], *unreported], key=lambda q: natural(q["name"]))
    if queue is None:
        return list(queues)
    chosen = [q for q in queues if q["name"] == queue or q["name"] == f"{pool}-queue-{queue}"]
    if not chosen:
        names = ", ".join(q["name"] for q in queues)
        raise KeyError(f"pool {pool!r} has no queue {queue!r} (its queues: {names})")
    return chosen


def act(client: Any, queues: list[dict[str, Any]], action: str, timeout: float, *args: Any) -> dict[str, Any]:
    """Run ``action`` (a key of :data:`ACTIONS`, with ``args``) on each queue's broker, on its
    worker, every worker at once, each within ``timeout``; return each queue's answer by name,
    in the order of ``queues``: what its broker answered, or ``{"error": why}`` for a queue
    not reached (no recent report, a worker that did not answer in time, or failed)."""
    import concurrent.futures

    method = ACTIONS[action]
    by_worker: dict[str, list[str]] = {}
    answers: dict[str, Any] = {q["name"]: None for q in queues}
    for q in queues:
        if q.get("unreported"):
            answers[q["name"]] = {"error": UNREPORTED}
        else:
            by_worker.setdefault(q["worker"], []).append(q["name"])

    def on(worker: str, names: list[str]) -> dict[str, Any]:
        try:
            out = client.run(_on_brokers, names, method, args, workers=[worker], on_error="return", callback_timeout=timeout)
        except TimeoutError:
            why = f"no answer from its worker {worker} within {timeout:g} s (stopped, or too busy)"
            if action not in _READ_ONLY:
                why += f": not known whether the {action} was done; it is done there if the worker takes the request when it resumes"
            return {name: {"error": why} for name in names}
        result = out.get(worker)
        if isinstance(result, BaseException) or result is None:
            why = f"{action} on worker {worker} failed: {result or 'no answer'}"
            return {name: {"error": why} for name in names}
        return dict(result)

    if by_worker:
        with concurrent.futures.ThreadPoolExecutor(len(by_worker), thread_name_prefix="zdq-cli-act") as pool:
            for done in pool.map(lambda item: on(*item), list(by_worker.items())):
                answers.update(done)
    return answers


def _on_brokers(names: list[str], method: str, args: tuple[Any, ...]) -> dict[str, Any]:
    """On a worker: call ``method`` of the brokers named ``names`` in this process."""
    from zdq.observe.feed import local_broker

    out: dict[str, Any] = {}
    for name in names:
        broker = local_broker(name)
        if broker is None:
            out[name] = {"error": f"queue {name} no longer runs on this worker"}
            continue
        value = getattr(broker, method)(*args)
        if method == "dead_letters":
            value = [{"chunk_id": d.chunk_id, "n_tasks": d.meta.n_tasks, "reason": d.reason} for d in value]
        elif method == "schedules":
            value = [schedule_row(raw) for raw in value]
        out[name] = value
    return out


def schedule_row(raw: bytes) -> dict[str, Any]:
    """A stored schedule as ``zdq schedules list`` shows it (JSON-able; its task and last result
    stay sealed: only the pool's driver holds their key)."""
    from zdq.codec.schedules import ScheduleRecord

    r = ScheduleRecord.unpack(raw)
    return {
        "schedule_id": r.schedule_id, "schedule_name": r.schedule_name or None, "task": r.name,
        "cron": r.spec.cron, "every": r.spec.every, "missed": r.missed.value, "next_tick": r.due,
        "ticks": r.ticks, "skipped": r.skipped, "last_tick": r.last_tick or None, "last_done": r.last_done or None,
        "priority": r.priority,
    }

"""Helpers for code that runs inside a Dask actor on a worker."""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable

__all__ = ["worker_address", "liveness_probe", "candidate_workers", "pick_worker", "start_supervisor"]


def _worker() -> Any:
    from distributed import get_worker

    try:
        return get_worker()
    except ValueError:
        return None


def worker_address() -> str | None:
    worker = _worker()
    return None if worker is None else str(worker.address)


def liveness_probe(instance: object) -> Callable[[], bool]:
    """A check that says whether ``instance`` is still a live actor on its worker.

    Dask drops an actor from ``worker.state.actors`` when its last future is released (the pool
    object was closed or garbage-collected) but calls no hook: the actor's own threads poll this
    to stop by themselves instead of running forever.
    """
    worker = _worker()
    state = getattr(worker, "state", None)
    actors = getattr(state, "actors", None)
    if actors is None:
        return lambda: True
    keys = [k for k, v in actors.items() if v is instance]
    if not keys:
        return lambda: True
    key = keys[0]
    return lambda: actors.get(key) is instance


def candidate_workers(client: Any, allowed: list[str] | None) -> list[str]:
    """Addresses of the live workers an actor may be placed on, in a stable order.

    ``allowed`` holds worker addresses or names; names survive a worker's restart by its nanny,
    so a pool restricted by name keeps placing replacements where it should.
    """
    workers = client.scheduler_info(n_workers=-1)["workers"]
    addresses = sorted(workers)
    if allowed is None:
        return addresses
    wanted = {str(a) for a in allowed}
    return [a for a in addresses if a in wanted or str(workers[a].get("name")) in wanted]


def pick_worker(client: Any, allowed: list[str] | None, slot: int, placed_on: dict[int, str]) -> str:
    """The worker for actor ``slot`` of a pool: spread by slot, never where it was just lost.

    ``placed_on`` remembers each slot's worker; a slot placed again avoids its previous worker,
    which the scheduler may not yet know is dead.
    """
    from zdq.errors import PlacementError

    workers = candidate_workers(client, allowed)
    lost = placed_on.get(slot)
    if lost is not None and len(workers) > 1 and lost in workers:
        workers.remove(lost)
    if not workers:
        raise PlacementError("no worker is available to place zdq actors on")
    address = workers[slot % len(workers)]
    placed_on[slot] = address
    return address


def _supervise(ref: weakref.ref[Any], stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        pool = ref()
        if pool is None:
            return
        pool._supervise_once()
        del pool


def start_supervisor(pool: Any, stop: threading.Event, name: str, interval: float = 0.25) -> threading.Thread:
    """A thread that calls ``pool._supervise_once()`` every ``interval`` seconds until ``stop``.

    It holds the pool only weakly: a pool that its program dropped without closing it (daskqueue
    programs never close theirs) is collected, its actors are released, and the thread ends.
    """
    thread = threading.Thread(target=_supervise, args=(weakref.ref(pool), stop, interval), name=name, daemon=True)
    thread.start()
    return thread

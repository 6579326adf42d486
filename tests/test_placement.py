"""Placing a pool (issue 26, point 7): consumers placed started start in their constructors (one
actor round trip less each), at once; one that cannot start fails the placement naming its worker;
started so, they still stop by themselves once Dask releases their actors."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from zdq import ConsumerBaseClass, ConsumerPool, QueuePool
from zdq._actor import scheduler_workers
from zdq.client.consumers import ConsumerSlots
from zdq.client.slots import release_future
from zdq.errors import ConsumerInitError, PlacementError, RemoteTaskError, ZdqError

from .conftest import wait_until
from .tasks import add

#: Where the consumers of the rendezvous test meet (the workers share this machine's disk).
_MEET = Path(tempfile.gettempdir()) / "zdq-test-placement-meet"
_MEETING = 2  # consumers, one per worker of the session cluster


class Rendezvous(ConsumerBaseClass):
    """Made when its consumer starts: waits (bounded) until every consumer of the pool is being
    started, which only happens if they start at the same time, not one after another."""

    def __init__(self, name: str = "", **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        (_MEET / name).touch()
        deadline = time.monotonic() + 20.0
        while len(list(_MEET.iterdir())) < _MEETING:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} started alone: the other consumers did not start meanwhile")
            time.sleep(0.01)

    def process_item(self, item: Any) -> Any:
        return item


class DBDown(Exception):
    """Pickles, but does not unpickle: its ``__init__`` wants two arguments, its ``args`` hold one."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(f"database at {host}:{port} is down")


class FindsItsDatabaseDown(ConsumerBaseClass):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        raise DBDown("db.example", 5432)

    def process_item(self, item: Any) -> Any:
        return item


class FailsOnItsSecondSlot(ConsumerBaseClass):
    """A consumer class that cannot be made on one worker (a missing library, a missing device)."""

    def __init__(self, name: str = "", **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        if name.endswith("-1"):
            raise RuntimeError("no device here")

    def process_item(self, item: Any) -> Any:
        return item


class CannotReachItsDatabase(ConsumerBaseClass):
    """Opens a resource per consumer in its __init__, which fails (daskqueue raised it at ConsumerPool)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        raise ConnectionError("database unreachable")

    def process_item(self, item: Any) -> Any:
        return item


def _consumer_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("zdq-consumer-", "zdq-standby-", "zdq-exec-"))]


def test_consumers_placed_started_start_at_the_same_time_and_serve(client: Client) -> None:
    shutil.rmtree(_MEET, ignore_errors=True)
    _MEET.mkdir()
    try:
        with QueuePool(client, 2) as qp, ConsumerPool(client, qp, Rendezvous, n_consumers=_MEETING, start=True):
            assert sorted(p.name for p in _MEET.iterdir()) == [f"Rendezvous-{i}" for i in range(_MEETING)]
            assert qp.put_many(list(range(100))).result(timeout=30) == list(range(100))
    finally:
        shutil.rmtree(_MEET, ignore_errors=True)


def test_a_consumer_that_cannot_start_at_placement_fails_it_naming_its_worker(client: Client) -> None:
    second = sorted(scheduler_workers(client))[1]  # where slot 1 goes
    with QueuePool(client, 1) as qp:
        with pytest.raises(PlacementError) as info:
            ConsumerPool(client, qp, FailsOnItsSecondSlot, n_consumers=2, start=True)
        message = str(info.value)
        assert "FailsOnItsSecondSlot-1" in message and second in message and "no device here" in message, message
        # The consumer that did start was stopped with the placement, not at its next heartbeat.
        assert not [t for ts in client.run(_consumer_threads).values() for t in ts if "FailsOnItsSecondSlot" in t]
        # The pool still serves a ConsumerPool that can start (the failed one left nothing behind).
        with ConsumerPool(client, qp, n_consumers=1, start=True):
            assert qp.submit(add, 2, 3).result(timeout=30) == 5


@pytest.mark.parametrize("start", [False, True], ids=["placed", "placed-started"])
def test_a_consumer_class_whose_init_raises_fails_the_consumer_pool_at_once_with_its_own_error_and_places_nothing(
    client: Client, start: bool
) -> None:
    with QueuePool(client, 1) as qp:
        started = time.monotonic()
        with pytest.raises(ConsumerInitError) as info:
            ConsumerPool(client, qp, CannotReachItsDatabase, n_consumers=2, start=start)
        assert time.monotonic() - started < 20.0, "the class's error must come at once, not after a timeout"
        error = info.value
        assert isinstance(error, PlacementError) and isinstance(error, ZdqError)
        assert type(error.__cause__) is ConnectionError and str(error.__cause__) == "database unreachable"
        message = str(error)
        assert "consumer class CannotReachItsDatabase raised ConnectionError in __init__" in message, message
        assert "database unreachable" in message and "2 of 2 consumers" in message, message
        assert not qp.consumer_pools(), "the failed ConsumerPool must not stay registered"
        # Nothing half-placed: the pool serves the next ConsumerPool (no actor or thread left: the
        # client fixture's leak check).
        with ConsumerPool(client, qp, n_consumers=1) as consumers:
            consumers.start()
            assert qp.submit(add, 2, 3).result(timeout=30) == 5


def test_a_consumer_class_whose_init_raises_an_error_that_does_not_unpickle_fails_the_pool_naming_that_error(
    client: Client,
) -> None:
    with QueuePool(client, 1) as qp:
        with pytest.raises(ConsumerInitError) as info:
            ConsumerPool(client, qp, FindsItsDatabaseDown, n_consumers=1)
        cause = info.value.__cause__
        # Dask sends it as itself (tblib rebuilds it without __init__), or it is a stand-in naming it.
        kind = cause.type_name if isinstance(cause, RemoteTaskError) else type(cause).__qualname__
        assert kind.endswith("DBDown") and "database at db.example:5432 is down" in str(cause), repr(cause)
        notes = "\n".join(getattr(cause, "__notes__", ()))
        assert "remote traceback" in notes and 'raise DBDown("db.example", 5432)' in notes, notes


def test_a_consumer_class_that_raises_on_one_worker_only_releases_the_consumers_that_were_made(client: Client) -> None:
    second = sorted(scheduler_workers(client))[1]  # where slot 1 goes
    with QueuePool(client, 1) as qp:
        with pytest.raises(ConsumerInitError) as info:
            ConsumerPool(client, qp, FailsOnItsSecondSlot, n_consumers=2)
        message = str(info.value)
        assert "FailsOnItsSecondSlot-1" in message and second in message and "RuntimeError" in message, message
        assert type(info.value.__cause__) is RuntimeError and "no device here" in str(info.value.__cause__)
    # The consumer made on the other worker was released with the placement: the client fixture's
    # leak check finds no actor left.


def test_consumers_placed_started_stop_by_themselves_once_their_actors_are_released(client: Client) -> None:
    with QueuePool(client, 1, heartbeat_interval=0.2, heartbeat_timeout=2.0) as qp:
        consumers = ConsumerPool(client, qp, n_consumers=2, start=True)
        try:
            assert any(client.run(_consumer_threads).values())
            # As when a pool's futures go without stop() (its program dropped it): Dask releases the
            # actors and calls no hook; the consumers find it out at their next heartbeat.
            for fut, actor in consumers._consumers.slots.take_all():
                release_future(fut, actor)
            wait_until(lambda: not any(client.run(_consumer_threads).values()), timeout=15)
        finally:
            consumers.close()


def _a_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.faults
def test_a_broker_that_cannot_open_in_its_constructor_fails_placement_naming_its_worker(client: Client) -> None:
    # One port for two brokers on this one host: the second to bind cannot, in its constructor.
    port = _a_free_port()
    workers = sorted(scheduler_workers(client))
    started = time.monotonic()
    with pytest.raises(PlacementError) as info:
        QueuePool(client, 2, ports=(port, port), placement_timeout=20.0)
    assert time.monotonic() - started < 20.0, "the placement must fail within placement-timeout"
    message = str(info.value)
    assert "no free port" in message and f"{port}-{port}" in message, message
    named = [w for w in workers if f" on {w} could not open" in message]
    assert len(named) == 1 and "broker " in message, message
    # Nothing left bound: the pool's other broker was stopped, the port is free for the next pool.
    with QueuePool(client, 1, ports=(port, port), placement_timeout=20.0) as qp:
        assert qp.endpoints[0].endswith(f":{port}")


@pytest.mark.faults
def test_a_consumer_whose_sockets_cannot_open_fails_placement_from_the_reach_step_naming_it(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its sockets open in the background (the constructor returns first); an endpoint that does
    # not parse fails them there, and the reach step that follows says so, naming it and its worker.
    monkeypatch.setattr(ConsumerSlots, "start_args", lambda self, i: (["tcp://no-such-host-or-port"], [0]))
    workers = sorted(scheduler_workers(client))
    with QueuePool(client, 1, placement_timeout=20.0) as qp:
        started = time.monotonic()
        with pytest.raises(PlacementError) as info:
            ConsumerPool(client, qp, n_consumers=2, start=True)
        assert time.monotonic() - started < 20.0, "the placement must fail within placement-timeout"
        message = str(info.value)
        for i, worker in enumerate(workers):
            assert f"GeneralConsumer-{i} on {worker} could not open its sockets" in message, message
        wait_until(lambda: not [t for ts in client.run(_consumer_threads).values() for t in ts], timeout=15)


def test_the_reach_of_every_consumer_is_asked_once_per_worker(client: Client) -> None:
    workers = scheduler_workers(client)
    with QueuePool(client, 2) as qp, ConsumerPool(client, qp, n_consumers=4, start=True) as consumers:
        slots = consumers._consumers
        # One consumer of each worker answers for all of that worker's (one actor call a worker).
        told = slots.reach._reach_by_worker(slots.reach.queues_up(), 30.0)
        assert sorted(told) == [0, 1, 2, 3] and len(set(slots.placed_on.values())) == len(workers)
        for reached, unreached in told.values():
            assert reached and not unreached
        assert qp.submit(add, 2, 3).result(timeout=30) == 5


def test_consumers_placed_at_once_go_beside_a_broker_they_serve_and_reach_it_in_process(client: Client) -> None:
    """Spread by slot, consumers 1 and 2 (of queues 0 and 1) were on the other queue's worker;
    placed beside the brokers they serve, each reaches its own over inproc (no CurveZMQ
    handshake), with as many consumers on each worker as before."""
    with QueuePool(client, 2) as qp, ConsumerPool(client, qp, n_consumers=4, fan_out=1, start=True) as consumers:
        slots = consumers._consumers
        assert slots.served == [[0], [0], [1], [1]]
        brokers = qp.workers()
        assert len(set(brokers)) == 2
        assert [slots.placed_on[i] for i in range(4)] == [brokers[0], brokers[0], brokers[1], brokers[1]]
        for worker, links in client.run(_consumer_links).items():
            assert links and all(a.startswith("inproc://") for a in links), (worker, links)
        assert qp.submit(add, 2, 3).result(timeout=30) == 5
        assert sum(qp.batch_submit([(add, i, 1) for i in range(40)]).result(timeout=30)) == sum(range(1, 41))


def _consumer_links() -> list[str]:
    """Where this worker's consumers' links go (inproc: a broker of this process)."""
    import gc

    from zdq.consumer.link import Link

    return [a for o in gc.get_objects() if isinstance(o, Link) and o._links is not None for a in o._links.addresses]


@pytest.mark.faults
def test_a_queue_whose_worker_is_stopped_fails_placement_naming_it_and_its_worker(client: Client) -> None:
    import os
    import signal

    from .conftest import stop_process

    address = sorted(scheduler_workers(client))[0]
    stopped = client.run(os.getpid, workers=[address])[address]
    stop_process(stopped)  # only stopped, then resumed: the session's cluster serves
    try:
        started = time.monotonic()
        with pytest.raises(PlacementError) as raised:
            QueuePool(client, 1, workers=[address], placement_timeout=3.0)
        took = time.monotonic() - started
    finally:
        os.kill(stopped, signal.SIGCONT)
    said = str(raised.value)
    assert "queue 0" in said and address in said and "did not answer" in said, said
    assert took < 3.0 + 5.0, f"placement failed after {took:.1f} s, its bound is 3 s"


def test_workers_listed_while_dask_refreshes_its_cached_identity(cluster: Any) -> None:
    """Placement asks the scheduler for its workers (``zdq._actor.scheduler_workers``), never
    reads the client's cached identity: Dask's periodic refresh of that cache asks for no workers
    and, landing between a fetch and its read, made ``client.scheduler_info()`` answer an empty
    cluster (a CI run failed "no worker is available" so). Refreshed every 1 ms here, the cache
    is wrong in about a third of the reads (every 5 ms: one in 25, measured with 1,500 rounds),
    so that 300 rounds show a cache read many times over; the workers zdq places on are never
    missing."""
    import dask

    from zdq._actor import candidate_workers

    with dask.config.set({"distributed.client.scheduler-info-interval": "1ms"}):
        with Client(cluster, set_as_default=False) as c:
            expected = sorted(cluster.scheduler_info["workers"])
            deadline = time.monotonic() + 60
            for _ in range(300):
                assert sorted(scheduler_workers(c)) == expected
                assert candidate_workers(c, None) == expected
                assert time.monotonic() < deadline, "the scheduler answered too slowly for this test"


@pytest.mark.cluster
def test_a_consumer_pool_interrupted_by_ctrl_c_while_placed_leaves_nothing_on_the_workers() -> None:
    """A Ctrl-C in ConsumerPool(...) left the consumers made on the workers for good: the actor
    proxies gathered before it held their keys, in the interrupt's traceback and reference
    cycles, past the queue pool's close() (a reviewer: 31 of 48 per interrupt, a minute later),
    and those released while their constructors ran stayed listed by Dask's scheduler.
    In a process of its own (its cluster too): pytest takes a SIGINT for its own."""
    run = subprocess.run(
        [sys.executable, "-m", "tests.interrupted_placement", "0.2", "20"],
        capture_output=True, text=True, timeout=180, cwd=Path(__file__).parent.parent,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["outcome"] == "interrupted"
    assert all(threads == 0 and actors == 0 for threads, actors in report["held"].values()), report
    # Released once made, not while their constructors ran: Dask's scheduler listed those for good.
    assert report["listed"] == 0, report

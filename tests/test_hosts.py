"""zdq across hosts: network namespaces as machines, real ``dask scheduler`` / ``dask worker``
processes in them (see ``tests/hosts.py``), this process as the client on their network.

Host b's worker is known by a name that resolves to 127.0.1.1 on b itself (Debian's /etc/hosts
habit): its brokers must bind b's interface toward the scheduler, or no other host reaches them.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import pytest
from distributed import Client

from zdq import BrokerUnreachable, ConsumerPool, QueuePool
from zdq._actor import scheduler_workers

from .conftest import wait_until
from .hosts import Hosts, skip_reason
from .tasks import add, sleep_return

pytestmark = [pytest.mark.cluster, pytest.mark.hosts, pytest.mark.timeout(180)]

#: Short, so that unreachable brokers are reported quickly.
FAST = {"connect_timeout": 3, "heartbeat_interval": "200ms", "heartbeat_timeout": "3s"}
#: For the test that waits out connect-timeout twice (the consumers' unreachable brokers, then
#: the lonely consumer's): 2 s, still ten heartbeats for a reachable broker to be heard.
FASTER_UNREACHABLE = {**FAST, "connect_timeout": 2}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    why = skip_reason()
    if why is not None:
        pytest.skip(why)
    made = Hosts(tmp_path_factory.mktemp("hosts"))
    try:
        made.start()
        yield made
    finally:
        made.close()


@pytest.fixture
def client(hosts: Hosts) -> Iterator[Client]:
    with Client(hosts.scheduler, timeout=30) as client:
        try:
            client.wait_for_workers(2, timeout=60)
        except TimeoutError:
            pytest.fail(f"the workers did not join: {hosts.log_tail('a')}\n{hosts.log_tail('b')}")
        yield client
        # Every pool a test made is gone from the cluster (its actor handles collected).
        gc.collect()
        def left() -> list[str]:
            return client.run_on_scheduler(_zdq_keys)  # type: ignore[no-any-return]

        try:
            wait_until(lambda: not left(), timeout=15)
        except pytest.fail.Exception:
            pytest.fail(f"zdq actors left on the scheduler: {left()}")


def _zdq_keys(dask_scheduler) -> list[str]:  # type: ignore[no-untyped-def]
    return [f"{k}: {ts.state} {ts.who_wants}" for k, ts in dask_scheduler.tasks.items() if str(k).startswith("zdq-")]


def _workers(client: Client) -> dict[str, str]:
    """Worker name -> address, as the scheduler knows them."""
    return {str(w["name"]): a for a, w in scheduler_workers(client).items()}


def test_a_transient_and_a_durable_pool_across_hosts_return_every_result(
    hosts: Hosts, client: Client, tmp_path: Path
) -> None:
    for durability, dirpath in (("transient", None), ("durable", tmp_path / "queues")):
        with QueuePool(client, 2, durability, dirpath, **FAST) as queue_pool, ConsumerPool(
            client, queue_pool, n_consumers=2
        ) as consumers:
            # One broker per host; b's binds b's address although b's name resolves to 127.0.1.1 there.
            assert sorted(e.rsplit(":", 1)[0] for e in queue_pool.endpoints) == [
                f"tcp://{hosts.a_ip}", f"tcp://{hosts.b_ip}",
            ]
            # Consumers first, and tasks of 5 ms: the first consumer up cannot take the whole run
            # before the other host's has asked for work (each holds at most its prefetch).
            consumers.start()
            batch = queue_pool.batch_submit([(sleep_return, i + 1, 0.005) for i in range(300)], batch_size=10)
            assert batch.result(timeout=60) == [i + 1 for i in range(300)]
            stats = consumers.statistics()
            assert sorted(s.worker.split("//")[1].split(":")[0] for s in stats) == sorted([hosts.a_ip, hosts.b_name])
            assert all(s.tasks_done for s in stats), stats  # both hosts' consumers worked
            assert not any(s.unreachable for s in stats)


def test_a_durable_queue_whose_worker_is_killed_comes_back_on_its_host_with_every_confirmed_task(
    hosts: Hosts, client: Client, tmp_path: Path
) -> None:
    with QueuePool(client, 2, "durable", tmp_path / "queues", **FAST) as queue_pool:
        batch = queue_pool.batch_submit([(add, i, 1) for i in range(400)], batch_size=10)
        queue_pool.flush(timeout=30)  # every chunk is confirmed: stored on disk
        victim = next(i for i, e in enumerate(queue_pool.endpoints) if hosts.b_ip in e)
        before = queue_pool.endpoints[victim]
        os.kill(queue_pool[victim].pid().result(timeout=30), signal.SIGKILL)
        # The nanny starts the worker again; the queue is placed again on the same host, same directory.
        wait_until(lambda: queue_pool.recoveries >= 1, timeout=90)
        after = queue_pool.endpoints[victim]
        assert after != before and hosts.b_ip in after
        with ConsumerPool(client, queue_pool, n_consumers=2) as consumers:
            consumers.start()
            assert batch.result(timeout=90) == [i + 1 for i in range(400)]


def _run_outside(hosts: Hosts, script: str, name: str, timeout: float) -> dict[str, Any]:
    """Run ``script`` in a namespace that reaches the scheduler only; the JSON objects it printed,
    merged (a later key wins)."""
    hosts.outside()
    log = hosts.logs / f"{name}.log"
    proc = hosts.popen("out", [sys.executable, "-c", script, hosts.scheduler], log)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the client outside the workers' network hung: {log.read_text(errors='replace')[-3000:]}")
    found = [json.loads(line) for line in log.read_text(errors="replace").splitlines() if line.startswith("{")]
    assert found, log.read_text(errors="replace")[-3000:]
    return {key: value for out in found for key, value in out.items()}


# One client outside the workers' network (one Python start with Dask's and zdq's imports, one
# connection), as a newcomer would go: a pool placed directly, whose brokers it cannot reach (a
# clear error, "direct"), then, as that error says, a pool through a relay ("relayed"). Each part
# prints its own line, so the first is there for its test whatever the second does.
_OUTSIDE_CLIENT = """
import json, sys, time
from distributed import Client
import zdq

def inc(x):
    return x + 1

with Client(sys.argv[1], timeout=30) as client:
    started = time.monotonic()
    try:
        # The default 10 s only makes the wait longer: no packet to a broker is ever answered
        # from here, so 1 s says the same.
        zdq.QueuePool(client, 2, connect_timeout=1)
        out = {"error": None}
    except Exception as e:
        out = {"error": type(e).__name__, "message": str(e)}
    out["seconds"] = time.monotonic() - started
    print(json.dumps({"direct": out}), flush=True)

    started = time.monotonic()
    with zdq.QueuePool(client, 2, relay=True) as queue_pool:
        with zdq.ConsumerPool(client, queue_pool, n_consumers=2, start=True):
            batch = queue_pool.batch_submit([(inc, i) for i in range(20000)]).result(timeout=60)
            one = queue_pool.submit(inc, 41).result(timeout=30)
            carried = queue_pool._relay.tunnel.carried
            relay_on = queue_pool._relay.worker
    out = {"ok": batch == [i + 1 for i in range(20000)], "one": one, "carried": carried, "relay_on": relay_on}
    out["seconds"] = time.monotonic() - started
print(json.dumps({"relayed": out}))
"""


@pytest.fixture(scope="module")
def _outside_runs() -> dict[str, dict[str, Any]]:
    return {}


@pytest.fixture
def outside(hosts: Hosts, client: Client, _outside_runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the client outside printed: ``direct`` and ``relayed`` (see ``_OUTSIDE_CLIENT``). Run
    by the first test that asks, once ``client`` has seen both workers join (a worker killed by
    the test before comes back meanwhile), and kept for the module."""
    if "run" not in _outside_runs:
        _outside_runs["run"] = _run_outside(hosts, _OUTSIDE_CLIENT, "outside", timeout=150)
    return _outside_runs["run"]


def test_a_client_that_reaches_only_the_scheduler_gets_a_clear_error_instead_of_a_hang(
    hosts: Hosts, client: Client, outside: dict[str, Any]
) -> None:
    out = outside["direct"]
    assert out["error"] == "BrokerUnreachable", out
    assert out["seconds"] < 60, out
    message = out["message"]
    assert f"reaches the Dask scheduler at {hosts.scheduler}" in message
    assert "none of the brokers' zdq ports" in message and "relay" in message
    for address in (hosts.a_ip, hosts.b_ip):
        assert f"{address}:" in message  # each broker's endpoint, and its worker
    assert "unanswered" in message  # the packets were dropped, not refused
    print(f"after {out['seconds']:.1f} s: {message}")


def test_a_client_that_reaches_only_the_scheduler_runs_its_tasks_through_a_relay(
    hosts: Hosts, client: Client, outside: dict[str, Any]
) -> None:
    assert "relayed" in outside, (hosts.logs / "outside.log").read_text(errors="replace")[-3000:]
    out = outside["relayed"]
    assert out["ok"] and out["one"] == 42, out
    assert min(out["carried"]) > 0, out  # every message went through the relay, both ways
    assert out["relay_on"] in set(_workers(client).values()), out
    print(f"relayed from outside in {out['seconds']:.1f} s: {out}")


def test_consumers_that_cannot_reach_a_broker_are_reported_and_a_queue_none_reaches_is_an_error(
    hosts: Hosts, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    hosts.block("a", hosts.b_ip)  # a and b no longer reach each other; both reach the scheduler
    try:
        with QueuePool(client, 2, **FASTER_UNREACHABLE) as queue_pool:
            on_a = next(i for i, e in enumerate(queue_pool.endpoints) if hosts.a_ip in e)
            with caplog.at_level(logging.WARNING, logger="zdq"):
                with ConsumerPool(client, queue_pool, n_consumers=2) as consumers:
                    consumers.start()  # each consumer reaches the queue on its own host: a warning
                    warning = "\n".join(r.getMessage() for r in caplog.records if "cannot reach" in r.getMessage())
                    assert "some consumers of pool" in warning, caplog.text
                    stats = consumers.statistics()
                    assert all(len(s.unreachable) == 1 for s in stats), stats
                    futures = [queue_pool.submit(add, i, 1) for i in range(50)]
                    assert [f.result(timeout=60) for f in futures] == [i + 1 for i in range(50)]
            workers = _workers(client)
            with ConsumerPool(client, queue_pool, n_consumers=1, workers=[workers["b"]]) as lonely:
                started = time.monotonic()
                with pytest.raises(BrokerUnreachable) as info:
                    lonely.start()
                assert time.monotonic() - started < 15
                message = str(info.value)
                assert f"reaches {queue_pool.queue_names[on_a]}" in message and hosts.a_ip in message
                assert "GeneralConsumer-0" in message
                print(message)
                # join() raises it too, at once, for the tasks that wait on that queue (it waited
                # for its whole timeout); and once the hosts reach each other, it returns.
                futures = [queue_pool.submit(add, i, 1) for i in range(20)]
                started = time.monotonic()
                with pytest.raises(BrokerUnreachable, match=queue_pool.queue_names[on_a]):
                    lonely.join(timeout=60)
                assert time.monotonic() - started < 10
                hosts.unblock("a", hosts.b_ip)
                wait_until(lambda: not lonely.unreached(), timeout=60)  # asked again until reached
                lonely.join(timeout=60)
                assert [f.result(timeout=30) for f in futures] == [i + 1 for i in range(20)]
    finally:
        hosts.unblock("a", hosts.b_ip)


def test_a_consumer_cut_off_from_its_broker_after_start_is_reported_and_join_says_so_until_the_cut_heals(
    hosts: Hosts, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """Reviewer 8's cut: a consumer that reached its broker, then lost its network to it (this
    process still reaching the broker), said nothing: its statistics showed no unreachable queue,
    and join() waited its whole timeout. Now the consumer reports the broker silent after the
    heartbeat timeout, join() raises BrokerUnreachable once no consumer hears the queue, and the
    work resumes when the cut heals, with the same consumer (a replacement would not help)."""
    workers = _workers(client)
    try:
        with QueuePool(client, 1, workers=[workers["a"]], **FAST) as queue_pool:
            with ConsumerPool(client, queue_pool, n_consumers=1, workers=[workers["b"]]) as consumers:
                consumers.start()
                assert queue_pool.submit(add, 1, 1).result(timeout=30) == 2
                with caplog.at_level(logging.WARNING, logger="zdq"):
                    hosts.block("b", hosts.a_ip)  # b loses its route to a; this process reaches both
                    futures = [queue_pool.submit(add, i, 1) for i in range(20)]
                    started = time.monotonic()
                    with pytest.raises(BrokerUnreachable) as caught:
                        consumers.join(timeout=60)
                    took = time.monotonic() - started
                    message = str(caught.value)
                    stats = consumers.statistics()
                assert took < 30, took  # the heartbeat timeout, a supervision round, a reach check
                assert queue_pool.queue_names[0] in message and "would never run" in message, message
                assert "reached before" in message and "was cut" in message, message
                assert "open the brokers' ports" not in message, message
                assert [len(s.unreachable) for s in stats] == [1], stats
                assert consumers.replacements == 0  # still the consumer it was: no use replacing it
                hosts.unblock("b", hosts.a_ip)
                wait_until(lambda: not consumers.unreached(), timeout=60)  # asked again until heard
                consumers.join(timeout=60)
                assert [f.result(timeout=30) for f in futures] == [i + 1 for i in range(20)]
                assert [s.unreachable for s in consumers.statistics()] == [()]
        print(message)
    finally:
        hosts.unblock("b", hosts.a_ip)


# -- a cluster that speaks tls:// ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    why = skip_reason()
    if why is not None:
        pytest.skip(why)
    made = Hosts(tmp_path_factory.mktemp("tls-hosts"), tls=True)
    try:
        made.start()
        yield made
    finally:
        made.close()


def test_a_tls_cluster_across_hosts_runs_pools_over_curve_on_the_workers_addresses(tls_hosts: Hosts) -> None:
    """Dask's tls:// workers (one of them known by a name that maps to 127.0.1.1 on its own
    host): zdq's sockets are TCP with CURVE on the same hosts, bound where the others reach them."""
    hosts = tls_hosts
    assert hosts.scheduler.startswith("tls://")
    with Client(hosts.scheduler, security=hosts.security, timeout=30) as client:
        try:
            client.wait_for_workers(2, timeout=60)
        except TimeoutError:
            pytest.fail(f"the workers did not join: {hosts.log_tail('sched')}\n{hosts.log_tail('b')}")
        assert all(a.startswith("tls://") for a in scheduler_workers(client))
        with pytest.raises(Exception, match="will not run its sockets unauthenticated"):
            QueuePool(client, 2, auth=False)
        with (
            QueuePool(client, 2, **FAST) as queue_pool,
            ConsumerPool(client, queue_pool, n_consumers=2, start=True) as consumers,
        ):
            assert sorted(e.split("//")[1].rsplit(":", 1)[0] for e in queue_pool.endpoints) == sorted(
                [hosts.a_ip, hosts.b_ip]
            ), queue_pool.endpoints
            assert all(e.startswith("tcp://") for e in queue_pool.endpoints)
            futures = [queue_pool.submit(add, i, 1) for i in range(200)]
            assert [f.result(timeout=60) for f in futures] == [i + 1 for i in range(200)]
            assert sum(s.tasks_done for s in consumers.statistics()) == 200
            assert all(not s.unreachable for s in consumers.statistics())
        gc.collect()
        wait_until(lambda: not client.run_on_scheduler(_zdq_keys), timeout=15)

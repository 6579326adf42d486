"""Real components for the tests: a LocalCluster of worker processes, sockets on 127.0.0.1.

Every test that uses ``client`` is checked for leaks afterwards: no zdq actor may remain on the
scheduler and no zdq thread in the driver or in any worker.
"""

from __future__ import annotations

import gc
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from distributed import Client, LocalCluster


_CLUSTER_FIXTURES = {"cluster", "client", "cluster3", "client3"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test that starts a cluster is marked `cluster` by the fixtures it uses, so that
    # `pytest -m "not cluster"` is the quick run without anyone having to remember the marker.
    # Everything under tests/unit/ is the unit tier (`pytest -m unit`): it runs in seconds after every edit.
    unit_dir = Path(__file__).parent / "unit"
    for item in items:
        if _CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)
        if unit_dir in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.unit)


def _zdq_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("zdq-")]


def _zdq_actor_keys(dask_scheduler) -> list[str]:  # type: ignore[no-untyped-def]
    return [str(k) for k in dask_scheduler.tasks if str(k).startswith("zdq-")]


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns a truthy value; fail the test at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s: {predicate} (last value {value!r})")
        time.sleep(interval)


def _assert_eventually_empty(probe, what: str, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if not found:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"leak: {what} still present after {timeout}s: {found!r}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, worker_dashboard_address=None
    ) as c:
        yield c


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Client]:
    with Client(cluster) as c:
        yield c
        assert_no_zdq_leaks(c)


def assert_no_zdq_leaks(c: Client) -> None:
    """Actors released, threads stopped, in the driver and in every worker."""
    gc.collect()  # pools a test dropped without closing (as daskqueue programs do) are collected
    _assert_eventually_empty(lambda: c.run_on_scheduler(_zdq_actor_keys), "zdq actors on the scheduler")
    _assert_eventually_empty(_zdq_threads, "zdq threads in the driver")
    _assert_eventually_empty(lambda: {w: t for w, t in c.run(_zdq_threads).items() if t}, "zdq threads in workers")


@pytest.fixture
def cluster3() -> Iterator[LocalCluster]:
    # One cluster per test: these tests kill workers, and a nanny's restart must not decide
    # whether the next test starts with three workers.
    with LocalCluster(
        n_workers=0, threads_per_worker=1, processes=True, dashboard_address=None, worker_dashboard_address=None
    ) as cluster:
        (template,) = cluster.new_worker_spec().values()
        for name in "abc":
            cluster.worker_spec[name] = {"cls": template["cls"], "options": {**template["options"], "name": name}}
        cluster.sync(cluster._correct_state)
        yield cluster


@pytest.fixture
def client3(cluster3: LocalCluster) -> Iterator[Client]:
    with Client(cluster3) as client:
        client.wait_for_workers(3, timeout=60)
        yield client


def pid_of(client: Client, name: str) -> int:
    """The pid of the worker process named ``name``."""
    pids = client.run(os.getpid)
    (address,) = [a for a, w in client.scheduler_info(n_workers=-1)["workers"].items() if w["name"] == name]
    return int(pids[address])


@pytest.fixture
def zmq_ctx() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB filesystem (tmpfs) that fills up; unmounted by the test. Needs root."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)

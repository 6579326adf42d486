"""Real components for the tests: a LocalCluster of worker processes, sockets on 127.0.0.1.

Every test that uses ``client`` is checked for leaks afterwards: no zdq actor may remain on the
scheduler and no zdq thread in the driver or in any worker.
"""

from __future__ import annotations

import gc
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from distributed import Client, LocalCluster


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
        gc.collect()  # pools a test dropped without closing (as daskqueue programs do) are collected
        # Leak checks: actors released, threads stopped, in the driver and in every worker.
        _assert_eventually_empty(lambda: c.run_on_scheduler(_zdq_actor_keys), "zdq actors on the scheduler")
        _assert_eventually_empty(_zdq_threads, "zdq threads in the driver")
        _assert_eventually_empty(lambda: {w: t for w, t in c.run(_zdq_threads).items() if t}, "zdq threads in workers")


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

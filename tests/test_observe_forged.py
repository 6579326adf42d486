"""Forged ``zdq-report``s from a task: a real cluster, a real pool, and a task that writes reports to
its worker's stream to the scheduler as the feed does. The monitor's listing, ``/metrics`` and
``zdq purge`` must show the real pool as it is: no fake queues, no fake pool, no queue taken over
by the wrong worker (the monitor's rules are in tests/unit/test_observe_senders.py)."""

from __future__ import annotations

import importlib.util
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from distributed import Client, LocalCluster, get_worker

from tests.conftest import assert_no_zdq_leaks, wait_until
from tests.inprocess_cli import zdq_here
from zdq import QueuePool
from zdq._actor import scheduler_workers

pytestmark = [pytest.mark.cluster, pytest.mark.faults]

#: Forged queues per report (a report holds 4096 entries at most): two reports claim 5,000.
_FORGED_PER_REPORT = 2500


@pytest.fixture(scope="module")
def forged_cluster() -> Iterator[LocalCluster]:
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0", worker_dashboard_address=None
    ) as cluster:
        yield cluster


@pytest.fixture
def forged_client(forged_cluster: LocalCluster) -> Iterator[Client]:
    with Client(forged_cluster) as c:
        yield c
        assert_no_zdq_leaks(c)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def _status(http: str) -> dict[str, Any]:
    return dict(json.loads(_get(f"{http}/zdq/status.json")))


def _shown_queues(http: str, pool: str) -> list[str]:
    return sorted(q["name"] for q in _status(http)["pools"].get(pool, {"queues": []})["queues"])


def _zdq_lines(http: str) -> list[str]:
    return [line for line in _get(f"{http}/metrics").splitlines() if line.startswith("zdq_")]


def _fake_queue(pool: str, name: str, **counts: int) -> dict[str, Any]:
    return {"pool": pool, "name": name, "id": f"forged-{name}", "endpoint": "tcp://127.0.0.1:1", "host": "127.0.0.1",
            "durable": False, "ready_tasks": counts.get("ready_tasks", 7), "tasks_stored": counts.get("tasks_stored", 7)}


def _forge(reports: list[dict[str, Any]]) -> int:
    """A task: send ``reports`` to the scheduler on this worker's stream, as zdq's feed sends its
    own (from the worker's event loop, which alone writes to the stream)."""
    worker = get_worker()
    for report in reports:
        worker.loop.add_callback(worker.batched_stream.send, {"op": "zdq-report", "interval": 1.0, **report})
    return len(reports)


def test_reports_forged_by_a_task_do_not_change_a_real_pools_listing_metrics_or_purge(
    forged_cluster: LocalCluster, forged_client: Client
) -> None:
    http = str(forged_cluster.dashboard_link).rsplit("/status", 1)[0]
    address = forged_cluster.scheduler_address
    with QueuePool(forged_client, 2, name="real") as pool:
        names = sorted(pool.queue_names)
        wait_until(lambda: _shown_queues(http, "real") == names, timeout=30, interval=0.3)
        real = {q["name"]: q for q in _status(http)["pools"]["real"]["queues"]}
        victim = real[names[0]]["worker"]
        workers = sorted(scheduler_workers(forged_client))
        other = next(w for w in workers if w != victim)
        # Without prometheus_client (the test extra has it) Dask serves no /metrics.
        metrics = len(_zdq_lines(http)) if importlib.util.find_spec("prometheus_client") else None

        forged = [
            *({"queues": [_fake_queue("real", f"real-queue-{i}") for i in range(k, k + _FORGED_PER_REPORT)]}
              for k in (2, 2 + _FORGED_PER_REPORT)),
            {"queues": [_fake_queue("fake", f"fake-queue-{i}") for i in range(_FORGED_PER_REPORT)]},
            # The real pool's first queue, from a worker that does not hold it.
            {"queues": [_fake_queue("real", names[0], tasks_stored=10**9, ready_tasks=10**6)]},
            # The same, naming the worker that holds it (Dask lets a message's field override the
            # stream's own `worker`).
            {"worker": victim, "queues": [_fake_queue("real", names[0], tasks_stored=10**9, ready_tasks=10**6)]},
            {"consumers": [{"pool": "fake", "name": f"C-{i}", "id": f"c{i}", "running": True} for i in range(2000)]},
        ]
        before = _status(http)["reports"]
        assert forged_client.submit(_forge, forged, workers=[other], pure=False).result(timeout=30) == len(forged)
        # Read once the forged reports and a round of real ones have been handled.
        wait_until(lambda: _status(http)["reports"] >= before + len(forged) + 2 * len(workers), timeout=30, interval=0.3)

        status = _status(http)
        assert sorted(status["pools"]) == ["real"], sorted(status["pools"])[:5]
        queues = {q["name"]: q for q in status["pools"]["real"]["queues"]}
        assert sorted(queues) == names, f"{len(queues)} queues listed"
        assert queues[names[0]]["worker"] == victim
        assert queues[names[0]]["tasks_stored"] < 10**9 and queues[names[0]]["ready_tasks"] < 10**6
        assert status["pools"]["real"]["consumers"] == []
        if metrics is not None:
            assert len(_zdq_lines(http)) == metrics
        # In this process (a Python start saved): tests/test_observe.py runs `zdq purge` as a subprocess.
        purged = zdq_here("purge", "--scheduler", address, "real", "--yes", "--timeout", "20")
        assert purged.returncode == 0, purged.stdout[-2000:] + purged.stderr[-2000:]
        assert sorted(line.split(":")[0] for line in purged.stdout.splitlines()) == names
        # No worker was dropped for what its task sent.
        assert sorted(scheduler_workers(forged_client)) == workers

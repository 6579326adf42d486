"""Watching and steering a live pool: the scheduler's monitor, /metrics, the /zdq page, the CLI.

Everything runs against a real LocalCluster with its dashboard served (the HTTP server the page and
the metrics live on); the CLI runs as a subprocess, as a user runs it.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client, LocalCluster

from tests.conftest import assert_no_zdq_leaks, knock_with_wrong_keys, wait_until
from tests.inprocess_cli import zdq_here
from tests.tasks import add, fail
import zdq
from zdq import ConsumerPool, QueuePool
from zdq._actor import scheduler_workers
from zdq.names import counted

pytestmark = pytest.mark.cluster

#: The BrokerStats fields the monitor must show as statistics() has them, once the pool is idle.
_QUEUE_FIELDS = (
    "ready_tasks", "leased_tasks", "awaiting_tasks", "dead_tasks", "tasks_stored", "tasks_acked",
    "tasks_dead_lettered", "chunks_redelivered", "bad_messages", "refused_peers", "consumers", "durable",
)


@pytest.fixture(scope="module")
def dash_cluster() -> Iterator[LocalCluster]:
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0", worker_dashboard_address=None
    ) as cluster:
        yield cluster


@pytest.fixture
def dash_client(dash_cluster: LocalCluster) -> Iterator[Client]:
    with Client(dash_cluster) as c:
        yield c
        assert_no_zdq_leaks(c)


def _http(cluster: LocalCluster) -> str:
    return str(cluster.dashboard_link).rsplit("/status", 1)[0]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def _zdq(*args: str, timeout: float = 60, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zdq.cli", *args], capture_output=True, text=True, timeout=timeout, input=stdin
    )


def _zdq_started(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "zdq.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finished(run: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    """``(exit status, stderr)`` of a command started by :func:`_zdq_started`; killed past ``timeout``."""
    try:
        _, stderr = run.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.kill()
        run.communicate()
        raise
    return run.returncode, stderr


@contextlib.contextmanager
def _shown_pool(cluster: LocalCluster, client: Client, name: str) -> Iterator[tuple[QueuePool, ConsumerPool]]:
    """A pool that ran 300 tasks, 3 of them failing for good (dead-lettered after a retry), whose
    first queue refused 10 handshakes with wrong keys, now idle, and shown by the monitor as its
    statistics() say. Closed (its dead letters purged) after."""
    queue_pool = QueuePool(client, 2, name=name)
    consumer_pool = ConsumerPool(client, queue_pool, n_consumers=2)
    with queue_pool, consumer_pool:
        ok = queue_pool.batch_submit([(add, i, 1) for i in range(300)], batch_size=50)
        bad = [queue_pool.submit(fail, f"boom {i}", retries=1, retry_backoff=0.01) for i in range(3)]
        consumer_pool.start()
        assert ok.result(timeout=60) == [i + 1 for i in range(300)]
        for future in bad:
            assert future.exception(timeout=60) is not None
        assert queue_pool.client_keys is not None
        knock_with_wrong_keys(
            queue_pool.endpoints[0], queue_pool.client_keys.server_public, 10,
            lambda: queue_pool.broker_statistics()[0].refused_peers,
        )
        wait_until(lambda: _matches(_http(cluster), queue_pool, consumer_pool), timeout=20, interval=0.3)
        yield queue_pool, consumer_pool
        queue_pool.purge_dead_letters()


def _matches(http: str, queue_pool: QueuePool, consumer_pool: ConsumerPool) -> bool:
    """The monitor shows what statistics() says (polled: reports arrive once a second)."""
    pool = json.loads(_get(f"{http}/zdq/status.json"))["pools"].get(queue_pool.name)
    if pool is None:
        return False
    expected = {b.name: b for b in queue_pool.statistics().brokers}
    shown = {q["name"]: q for q in pool["queues"]}
    if set(shown) != set(expected):
        return False
    if any(shown[n][f] != getattr(b, f) for n, b in expected.items() for f in _QUEUE_FIELDS):
        return False
    consumers = {c.name: c for c in consumer_pool.statistics()}
    shown_c = {c["name"]: c for c in pool["consumers"]}
    return set(shown_c) == set(consumers) and all(
        shown_c[n]["tasks_done"] == c.tasks_done and shown_c[n]["tasks_failed"] == c.tasks_failed
        for n, c in consumers.items()
    )


def test_metrics_endpoint_serves_zdq_counters_and_gauges_that_match_statistics(
    dash_cluster: LocalCluster, dash_client: Client
) -> None:
    parser = pytest.importorskip("prometheus_client.parser", reason="prometheus_client is not installed: Dask serves no /metrics")
    text_string_to_metric_families = parser.text_string_to_metric_families
    http = _http(dash_cluster)
    with _shown_pool(dash_cluster, dash_client, "metered") as (queue_pool, consumer_pool):
        brokers = {b.name: b for b in queue_pool.statistics().brokers}
        consumers = consumer_pool.statistics()
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(_get(f"{http}/metrics")):
            for s in family.samples:
                if s.name.startswith("zdq_") and s.labels.get("pool") == "metered":
                    samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

        def value(name: str, queue: str | None = None) -> float:
            labels = {"pool": "metered", **({"queue": queue} if queue else {})}
            return samples[(name, tuple(sorted(labels.items())))]

        for name, b in brokers.items():
            assert value("zdq_tasks_submitted_total", name) == b.tasks_stored
            assert value("zdq_tasks_acked_total", name) == b.tasks_acked
            assert value("zdq_tasks_dead_lettered_total", name) == b.tasks_dead_lettered
            assert value("zdq_chunks_redelivered_total", name) == b.chunks_redelivered
            assert value("zdq_bad_messages_total", name) == b.bad_messages
            assert value("zdq_refused_peers_total", name) == b.refused_peers
            assert value("zdq_queue_ready", name) == b.ready_tasks
            assert value("zdq_queue_leased", name) == b.leased_tasks
            assert value("zdq_queue_dead", name) == b.dead_tasks
            assert value("zdq_queue_consumers", name) == b.consumers
            assert value("zdq_chunk_round_trip_seconds_count", name) == b.chunks_acked
        assert sum(b.tasks_stored for b in brokers.values()) == 303
        assert sum(b.tasks_dead_lettered for b in brokers.values()) == 3
        assert sum(b.refused_peers for b in brokers.values()) >= 10
        assert value("zdq_tasks_completed_total") == sum(c.tasks_done for c in consumers) == 300
        assert value("zdq_tasks_failed_total") == sum(c.tasks_failed for c in consumers) == 3
        assert value("zdq_tasks_retried_total") == sum(c.tasks_retried for c in consumers) == 3
        assert value("zdq_consumers_live") == 2
        # Bounded labels: pool, queue and the histogram's buckets, never a task.
        assert {k for _, labels in samples for k, _ in labels} <= {"pool", "queue", "le"}


def test_status_command_lists_a_live_pool_with_the_counts_of_statistics(
    dash_cluster: LocalCluster, dash_client: Client
) -> None:
    with _shown_pool(dash_cluster, dash_client, "watched") as (queue_pool, consumer_pool):
        address = dash_cluster.scheduler_address
        # --watch prints again until stopped: two rounds within the bound, then the process is
        # ended. It is the family's one run as a subprocess, as a user runs it (started first: its
        # Python start overlaps the checks below); the one-shot runs are made in this process.
        watch = subprocess.Popen(
            [sys.executable, "-m", "zdq.cli", "status", "--scheduler", address, "--watch", "0.5", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            proc = zdq_here("status", "--scheduler", address, "--json")
            assert proc.returncode == 0, proc.stderr
            pool = json.loads(proc.stdout)["pools"]["watched"]
            brokers = {b.name: b for b in queue_pool.statistics().brokers}
            assert {q["name"]: (q["ready_tasks"], q["tasks_stored"], q["dead_tasks"], q["refused_peers"]) for q in pool["queues"]} == {
                n: (b.ready_tasks, b.tasks_stored, b.dead_tasks, b.refused_peers) for n, b in brokers.items()
            }
            assert pool["totals"]["completed"] == 300 and pool["totals"]["failed"] == 3
            assert sorted(c["name"] for c in pool["consumers"]) == ["GeneralConsumer-0", "GeneralConsumer-1"]
            text = zdq_here("status", "--scheduler", address)
            assert text.returncode == 0, text.stderr
            assert "pool watched: 2 queues, 2 consumers; submitted 303, completed 300, failed 3" in text.stdout
            assert "watched-queue-0" in text.stdout and "GeneralConsumer-1" in text.stdout
            assert " refused " in text.stdout.splitlines()[1]  # the queues' header: refused handshakes
            assert watch.stdout is not None
            first, second = watch.stdout.readline(), watch.stdout.readline()
            assert "watched" in json.loads(first)["pools"] and "watched" in json.loads(second)["pools"]
        finally:
            watch.kill()
            watch.wait(timeout=10)


def test_dead_letters_commands_list_requeue_and_purge_a_live_pools_dead_letters(
    dash_cluster: LocalCluster, dash_client: Client
) -> None:
    with _shown_pool(dash_cluster, dash_client, "lettered") as (queue_pool, consumer_pool):
        address = dash_cluster.scheduler_address
        listed = _zdq("dead-letters", "list", "--scheduler", address, "lettered", "--json")
        assert listed.returncode == 0, listed.stderr
        letters = json.loads(listed.stdout)
        # Ids as strings: a JSON reader's double is exact only to 2**53 (reviewer 27b).
        assert all(isinstance(d["chunk_id"], str) for found in letters.values() for d in found), letters
        chunks = {(q, int(d["chunk_id"])) for q, found in letters.items() for d in found}
        assert chunks == {(d.queue, d.chunk_id) for d in queue_pool.dead_letters()} and len(chunks) == 3
        assert all("boom" in d["reason"] for found in letters.values() for d in found)
        # One command family run as a subprocess (above) is enough: the rest run in this process.
        text = zdq_here("dead-letters", "list", "--scheduler", address, "lettered")
        assert text.returncode == 0 and text.stdout.count("boom") == 3, text.stdout + text.stderr

        unknown = zdq_here("dead-letters", "requeue", "--scheduler", address, "lettered", "--chunk", "987654321")
        assert unknown.returncode == 1 and "1 of the chunks given is not a dead letter" in unknown.stderr, unknown.stderr
        queue, chunk_id = sorted(chunks)[0]
        requeued = zdq_here("dead-letters", "requeue", "--scheduler", address, "lettered", queue, "--chunk", str(chunk_id))
        assert requeued.returncode == 0, requeued.stderr
        assert f"{queue}: 1 dead chunk requeued" in requeued.stdout
        wait_until(lambda: len(queue_pool.dead_letters()) == 3, timeout=30)  # it failed again, and is back

        refused = zdq_here("dead-letters", "purge", "--scheduler", address, "lettered", stdin="")
        assert refused.returncode == 1 and "--yes" in refused.stderr and len(queue_pool.dead_letters()) == 3
        purged = zdq_here("dead-letters", "purge", "--scheduler", address, "lettered", "--yes")
        assert purged.returncode == 0, purged.stderr
        assert queue_pool.dead_letters() == []


def test_purge_command_cancels_the_ready_tasks_so_that_they_never_run_and_their_futures_settle(
    dash_cluster: LocalCluster, dash_client: Client
) -> None:
    from concurrent.futures import CancelledError

    from zdq.errors import TaskCancelled

    with QueuePool(dash_client, 2, name="purged") as queue_pool:
        futures = [queue_pool.submit(add, i, 1) for i in range(38)]
        futures += [queue_pool.submit(add, i, 1, delay=3600) for i in range(2)]  # not ready for an hour
        queue_pool.flush(timeout=30)
        wait_until(lambda: sum(queue_pool.get_queue_size().values()) == 40, timeout=30)
        http = _http(dash_cluster)
        wait_until(
            lambda: sum(q["ready_tasks"] + q["delayed_tasks"] for q in json.loads(_get(f"{http}/zdq/status.json"))["pools"]
                        .get("purged", {"queues": []})["queues"]) == 40,
            timeout=20,
            interval=0.3,
        )
        address = dash_cluster.scheduler_address
        asked = _zdq("purge", "--scheduler", address, "purged", stdin="")
        assert asked.returncode == 1 and "--yes" in asked.stderr
        assert "cancel the 38 ready tasks and 2 delayed tasks" in asked.stderr  # what it would cancel, all of it
        one = zdq_here("purge", "--scheduler", address, "purged", "0", "--yes")  # a subprocess just above
        assert one.returncode == 0, one.stderr
        (line,) = one.stdout.splitlines()
        cancelled = re.fullmatch(r"purged-queue-0: (\d+) waiting tasks? cancelled", line)
        assert cancelled is not None, line
        cancelled_here = int(cancelled[1])
        rest = zdq_here("purge", "--scheduler", address, "purged", "--yes")
        assert rest.returncode == 0, rest.stderr
        assert f"purged-queue-1: {counted(40 - cancelled_here, 'waiting task')} cancelled" in rest.stdout
        with ConsumerPool(dash_client, queue_pool, n_consumers=1) as consumer_pool:
            consumer_pool.start()
            for future in futures:
                # As future.cancel() leaves them (reviewer 12: they read failed, not cancelled).
                with pytest.raises(CancelledError):
                    future.result(timeout=60)
                assert future.cancelled()
            assert sum(c.tasks_done for c in consumer_pool.statistics()) == 0  # none ran
            stats = queue_pool.statistics().driver
            assert (stats.tasks_cancelled, stats.tasks_failed) == (40, 0)  # counted as cancelled
            kept = consumer_pool.results()
            assert sum(isinstance(v, TaskCancelled) for d in kept.values() for v in d.values()) == 40


def _purged(address: str, pool: str) -> subprocess.CompletedProcess[str]:
    """``zdq purge --yes`` of ``pool``, once the scheduler lists it (a pool's first report reaches
    it about a second after the pool is made)."""
    runs: list[subprocess.CompletedProcess[str]] = []

    def listed() -> bool:
        runs.append(zdq_here("purge", "--scheduler", address, pool, "--yes"))
        return "no live pool named" not in runs[-1].stderr

    wait_until(listed, timeout=30, interval=0.2)
    assert runs[-1].returncode == 0, runs[-1]
    return runs[-1]


def test_a_cancel_after_a_purge_ends_every_future_of_the_chunk_and_counts_each_once(
    dash_cluster: LocalCluster, dash_client: Client
) -> None:
    """Reviewer 13: after `zdq purge`, one future's cancel() took its chunk out of the queue, and
    the chunk's other futures waited for ever (their DONE never came). The broker now tells the
    driver every task of a chunk that leaves that way."""
    from concurrent.futures import CancelledError

    with QueuePool(dash_client, 1, name="purged-then-cancelled") as queue_pool:
        batch = queue_pool.batch_submit([(add, i, 1) for i in range(10)])  # one chunk of ten
        queue_pool.flush(timeout=30)
        wait_until(lambda: sum(queue_pool.get_queue_size().values()) == 10, timeout=30)
        purged = _purged(dash_cluster.scheduler_address, "purged-then-cancelled")
        assert "10 waiting tasks cancelled" in purged.stdout, purged
        assert batch.cancel()  # the chunk leaves the queue now
        with ConsumerPool(dash_client, queue_pool, n_consumers=1) as consumer_pool:
            consumer_pool.start()
            with pytest.raises(CancelledError):
                batch.result(timeout=30)
            assert batch.cancelled() and sum(queue_pool.get_queue_size().values()) == 0
            consumer_pool.join(timeout=30)
        stats = queue_pool.statistics().driver
        assert (stats.tasks_cancelled, stats.tasks_failed, stats.tasks_completed) == (10, 0, 10), stats


def test_a_task_cancel_after_a_purge_ends_every_other_future_of_its_chunk(
    dash_cluster: LocalCluster, dash_client: Client
) -> None:
    from concurrent.futures import CancelledError

    with QueuePool(dash_client, 1, name="purged-one-cancelled") as queue_pool:
        calls = [(add, i, 1) for i in range(10)]
        futures = queue_pool.map(add, range(10), [1] * 10)
        queue_pool.flush(timeout=30)
        wait_until(lambda: sum(queue_pool.get_queue_size().values()) == len(calls), timeout=30)
        _purged(dash_cluster.scheduler_address, "purged-one-cancelled")
        assert futures[1].cancel()
        with ConsumerPool(dash_client, queue_pool, n_consumers=1) as consumer_pool:
            consumer_pool.start()  # for the chunks the cancel left in the queue, purged
            done, pending = zdq.wait(futures, timeout=30)
        assert not pending and all(f.cancelled() for f in futures), pending
        with pytest.raises(CancelledError):
            futures[5].result(timeout=1)
        assert queue_pool.statistics().driver.tasks_cancelled == 10


def test_cli_gives_a_one_line_error_for_a_wrong_address_a_cluster_without_zdq_and_an_unknown_pool(
    dash_cluster: LocalCluster, dash_client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    # A closed port, addresses that do not parse, a port that accepts but does not speak Dask, and
    # bad options: one line each, in time. The commands that connect run side by side (each is a
    # Python start), the one to a cluster without zdq among them; those refused before connecting
    # (the addresses that do not parse, the bad options), the unknown pool and --version run in
    # this process.
    import socket
    import time

    with (
        socket.socket() as silent,
        LocalCluster(n_workers=0, processes=False, protocol="tcp://", dashboard_address=None) as bare,
        caplog.at_level("ERROR"),
    ):
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        addresses = ["tcp://127.0.0.1:9", "nonsense", "tcp://127.0.0.1", "http://127.0.0.1:80", f"tcp://127.0.0.1:{silent.getsockname()[1]}"]
        connecting = {0, 4}  # the others are refused before any connection
        options = (["--watch", "-1"], ["--timeout", "0"])
        began = time.monotonic()
        runs = {i: _zdq_started("status", "--scheduler", address, "--timeout", "1") for i, address in enumerate(addresses) if i in connecting}
        to_bare = _zdq_started("status", "--scheduler", bare.scheduler_address)
        try:
            unparsed = {i: zdq_here("status", "--scheduler", address, "--timeout", "2") for i, address in enumerate(addresses) if i not in connecting}
            # Refused before any connection: checked in this process (no Python start each).
            refused = [zdq_here("status", "--scheduler", dash_cluster.scheduler_address, *option) for option in options]
            finished = {i: _finished(run, timeout=30) for i, run in runs.items()}
            finished.update({i: (run.returncode, run.stderr) for i, run in unparsed.items()})
            done = [finished[i] for i in range(len(addresses))]
            took = time.monotonic() - began
            none = _finished(to_bare, timeout=30)
        finally:
            for run in [*runs.values(), to_bare]:  # none left behind if one timed out
                if run.poll() is None:
                    run.kill()
                    run.wait(timeout=10)
        assert took < 20
    for address, (code, stderr) in zip(addresses, done):
        assert code == 1 and len(stderr.strip().splitlines()) == 1, (address, stderr)
    assert done[0][1].startswith("zdq status: cannot reach a Dask scheduler at tcp://127.0.0.1:9")
    for run in refused:
        assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert "must be a positive number" in run.stderr, run.stderr
    assert none[0] == 1 and len(none[1].strip().splitlines()) == 1, none[1]
    assert "runs no zdq pool" in none[1]
    assert not [r for r in caplog.records if "zdq_status" in r.getMessage()]  # no traceback in its log
    with QueuePool(dash_client, 1, name="known"):
        unknown = zdq_here("dead-letters", "list", "--scheduler", dash_cluster.scheduler_address, "unknown")
        assert unknown.returncode == 1 and len(unknown.stderr.strip().splitlines()) == 1, unknown.stderr
        assert "no live pool named 'unknown'" in unknown.stderr and "known" in unknown.stderr
    version = zdq_here("--version")
    assert version.returncode == 0 and version.stdout.startswith("zdq ")


def _browser() -> Any:
    """Headless Chromium driven by playwright, or a skip that says what is missing."""
    import shutil

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        why = _install_chromium()
        executable = shutil.which("chromium")
        if executable is None:
            pytest.skip(f"no chromium on this machine, and it could not be installed: {why}")
    return sync_playwright, executable


def _install_chromium() -> str:
    """Install Debian's chromium (as root, with apt-get); say why not otherwise."""
    import os
    import shutil

    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "installing it needs root and apt-get (apt-get install chromium)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"])
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=600, env=env)
        except subprocess.TimeoutExpired:
            return f"{' '.join(step)} took over 10 minutes"
        if done.returncode != 0:
            return f"{' '.join(step)} failed: {done.stderr.strip()[-300:]}"
    return "apt-get install chromium ran, but no chromium command is on the PATH"


def test_dashboard_page_shows_the_live_pool_with_the_numbers_of_statistics_in_headless_chromium(
    dash_cluster: LocalCluster, dash_client: Client, tmp_path: Path
) -> None:
    sync_playwright, executable = _browser()
    http = _http(dash_cluster)
    with _shown_pool(dash_cluster, dash_client, "shown") as (queue_pool, consumer_pool), sync_playwright() as pw:
        # The pool installed the page (whatever ran before on this cluster: the suite spreads tests).
        listing = json.loads(_get(f"{http}/sitemap.json"))["paths"]
        assert "/zdq" in {p.rstrip("/?") for p in listing}, listing
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(f"{http}/zdq", timeout=30_000)
            brokers = queue_pool.statistics().brokers
            consumers = consumer_pool.statistics()

            def rendered() -> dict[tuple[str, str], str]:
                # Read in one call into the page (a call per cell and attribute took a second).
                cells = page.evaluate(
                    """() => Array.from(document.querySelectorAll('td[data-pool="shown"][data-field]'), cell => [
                        cell.getAttribute("data-queue") || cell.getAttribute("data-consumer") || "totals",
                        String(cell.getAttribute("data-field")), cell.innerText])"""
                )
                return {(who, field): text for who, field, text in cells}

            def shows_statistics() -> bool:
                cells = rendered()
                return all(
                    cells.get((b.name, f)) == str(getattr(b, f)).lower() if f == "durable" else
                    cells.get((b.name, f)) == str(getattr(b, f))
                    for b in brokers for f in ("ready_tasks", "leased_tasks", "dead_tasks", "tasks_stored", "durable")
                ) and all(
                    cells.get((c.name, "tasks_done")) == str(c.tasks_done)
                    and cells.get((c.name, "tasks_failed")) == str(c.tasks_failed)
                    for c in consumers
                ) and cells.get(("totals", "completed")) == "300" and cells.get(("totals", "failed")) == "3"

            wait_until(shows_statistics, timeout=15, interval=0.5)  # the page refreshes by itself
            # The rate plot needs two of the monitor's samples a second apart; the table's numbers
            # can be right after the first, so the plot is waited for on its own.
            wait_until(lambda: page.query_selector('[data-pool-name="shown"] svg polyline') is not None,
                       timeout=15, interval=0.5)
            shot = tmp_path / "zdq-dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()


def _reports(dask_scheduler: Any = None) -> tuple[int, int]:
    monitor = dask_scheduler.extensions["zdq"]
    return monitor.reports, monitor.entries


def test_the_scheduler_hears_one_report_per_worker_a_second_whatever_the_number_of_queues(
    dash_cluster: LocalCluster, dash_client: Client
) -> None:
    import time

    with QueuePool(dash_client, 12, name="many"), QueuePool(dash_client, 2, name="few"):
        http = _http(dash_cluster)
        wait_until(lambda: {"many", "few"} <= set(json.loads(_get(f"{http}/zdq/status.json"))["pools"]), timeout=20)
        before, t0 = dash_client.run_on_scheduler(_reports), time.monotonic()
        # Three seconds' worth of queue entries (14 a second), waited for rather than slept: the
        # counts are then taken over however long they took on this machine.
        wait_until(lambda: dash_client.run_on_scheduler(_reports)[1] - before[1] >= 14 * 3, timeout=30, interval=0.2)
        after, elapsed = dash_client.run_on_scheduler(_reports), time.monotonic() - t0
        workers = len(scheduler_workers(dash_client))
        # One message per worker process and interval (1 s), carrying all 14 queues between them.
        assert after[0] - before[0] <= workers * (elapsed + 1)
        assert after[1] - before[1] >= 14 * (elapsed - 1)


def test_status_reaches_a_tls_cluster_with_the_security_settings_of_dask_config_and_fails_in_one_line_without(
    tmp_path: Path,
) -> None:
    import os

    pytest.importorskip("cryptography", reason="Security.temporary() needs cryptography")
    from distributed.security import Security

    security = Security.temporary()
    files = {}
    for field in ("tls_ca_file", "tls_client_cert", "tls_client_key"):
        path = tmp_path / f"{field}.pem"
        path.write_text(getattr(security, field))
        files[field] = str(path)
    env = {
        **os.environ,
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": files["tls_ca_file"],
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": files["tls_client_cert"],
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": files["tls_client_key"],
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
    }
    with (
        LocalCluster(
            n_workers=1, processes=False, protocol="tls://", security=security, dashboard_address=None,
            worker_dashboard_address=None,
        ) as tls,
        Client(tls, security=security) as client,
        QueuePool(client, 1, name="secured"),
    ):
        address = tls.scheduler_address
        assert address.startswith("tls://")
        command = [sys.executable, "-m", "zdq.cli", "status", "--scheduler", address, "--json"]
        # The run without the settings goes on beside the runs with them (each is a Python start).
        without = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(
                lambda: "secured" in json.loads(
                    subprocess.run(command, capture_output=True, text=True, timeout=60, env=env).stdout or '{"pools": {}}'
                )["pools"],
                timeout=30,
                interval=0.5,
            )
            code, stderr = _finished(without, timeout=60)
        finally:
            if without.poll() is None:
                without.kill()
                without.wait(timeout=10)
        plain = subprocess.CompletedProcess(command, code, "", stderr)
        assert plain.returncode == 1 and len(plain.stderr.strip().splitlines()) == 1, plain.stderr
        assert plain.stderr.startswith(f"zdq status: cannot reach a Dask scheduler at {address}")


async def _feed_emptied_and_fed_again(seconds: float) -> None:
    """On a worker (its event loop free meanwhile): the process's feed loses its last source and
    gets a new one at once, as when a pool closes and the next one is placed; the new one is
    reported for ``seconds``."""
    import asyncio
    import threading
    import time

    from zdq.observe.feed import Source, add_source, remove_source
    from zdq.stats import ConsumerStats

    stats = ConsumerStats("Probe", "", True, 0, 0, 0, 0, 0)
    reported = threading.Event()

    def first_stats() -> ConsumerStats:
        reported.set()
        return stats

    first = Source("consumer", "probe", "Probe-0", first_stats, lambda: True)
    second = Source("consumer", "probe", "Probe-1", lambda: stats, lambda: True)
    from zdq.observe import feed

    add_source(first)
    # The feed thread has built a report with `first`: it is past that report, on its way to (or
    # in) the wait for the next one, where the swap below must find it.
    deadline = time.monotonic() + 20
    while not reported.is_set():
        if time.monotonic() > deadline:
            raise TimeoutError("the feed thread did not report its first source within 20 s (no zdq monitor on the scheduler?)")
        await asyncio.sleep(0.02)
    # remove_source(first) then add_source(second), both before the feed thread wakes: done in
    # one hold of the feed's lock, so that the thread cannot run in between (the race, made sure).
    with feed._feed._lock:
        del feed._feed._sources[id(first)]
        feed._feed._wake.set()  # what remove() does when the last source leaves
        feed._feed._sources[id(second)] = second  # what add() does while the thread lives
    await asyncio.sleep(seconds)
    remove_source(second)


def test_a_feed_emptied_and_fed_again_keeps_reporting_once_a_second(
    dash_cluster: LocalCluster, dash_client: Client
) -> None:
    import time

    with QueuePool(dash_client, 1, name="installer"):  # the monitor is installed
        worker = sorted(scheduler_workers(dash_client))[0]
        wait_until(lambda: dash_client.run_on_scheduler(_reports)[0] > 0, timeout=20)
        before = dash_client.run_on_scheduler(_reports)[0]
        t0 = time.monotonic()
        dash_client.run(_feed_emptied_and_fed_again, 3.0, workers=[worker])
        reports = dash_client.run_on_scheduler(_reports)[0] - before
        elapsed = time.monotonic() - t0
    workers = len(scheduler_workers(dash_client))
    assert reports <= workers * (elapsed + 2), f"{reports} reports in {elapsed:.1f} s from {workers} workers"


def _send_forged_report(dask_worker: Any = None) -> None:
    # What a task (or a worker of another zdq version) can send: a counter that is no number.
    dask_worker.batched_stream.send(
        {"op": "zdq-report", "interval": 1.0, "consumers": [],
         "queues": [{"pool": "evil", "name": "evil-queue-0", "tasks_stored": "lots"}, {"pool": "evil"}]}
    )


def test_a_malformed_report_from_a_worker_is_dropped_and_every_worker_stays_in_the_cluster(
    dash_cluster: LocalCluster, dash_client: Client
) -> None:
    http = _http(dash_cluster)
    queue_pool = QueuePool(dash_client, 2, name="poisoned")
    consumer_pool = ConsumerPool(dash_client, queue_pool, n_consumers=2)
    with queue_pool, consumer_pool:
        consumer_pool.start()
        assert queue_pool.batch_submit([(add, i, 1) for i in range(20)]).result(timeout=60) == list(range(1, 21))
        workers = sorted(scheduler_workers(dash_client))
        reports = dash_client.run_on_scheduler(_reports)[0]
        dash_client.run(_send_forged_report, workers=workers[:1])
        dash_client.run(_send_forged_report, workers=workers[:1])
        # Reports keep arriving and being read; no worker was removed for them.
        wait_until(lambda: dash_client.run_on_scheduler(_reports)[0] >= reports + 4, timeout=10, interval=0.2)
        assert sorted(scheduler_workers(dash_client)) == workers
        assert queue_pool.submit(add, 1, 1).result(timeout=30) == 2
        status = json.loads(_get(f"{http}/zdq/status.json"))
        assert "evil" not in status["pools"] and "poisoned" in status["pools"]
        assert status["dropped"] >= 4  # two entries of each forged report
        with contextlib.suppress(ImportError):
            import prometheus_client  # noqa: F401 - without it Dask serves no /metrics

            assert "zdq_tasks_submitted_total" in _get(f"{http}/metrics")


def test_two_consumer_pools_on_one_queue_pool_show_all_their_consumers_though_their_names_repeat(
    dash_cluster: LocalCluster, dash_client: Client
) -> None:
    http = _http(dash_cluster)
    queue_pool = QueuePool(dash_client, 2, name="twice")
    first = ConsumerPool(dash_client, queue_pool, n_consumers=2)
    second = ConsumerPool(dash_client, queue_pool, n_consumers=2)
    with queue_pool, first, second:
        done = queue_pool.batch_submit([(add, i, 1) for i in range(400)], batch_size=20)
        first.start()
        second.start()
        assert done.result(timeout=60) == [i + 1 for i in range(400)]
        stats = [*first.statistics(), *second.statistics()]
        assert len({c.name for c in stats}) == 2  # daskqueue's names, repeated by the second pool

        def shown() -> bool:
            pool = json.loads(_get(f"{http}/zdq/status.json"))["pools"].get("twice")
            return (
                pool is not None
                and len(pool["consumers"]) == 4
                and pool["totals"]["completed"] == sum(c.tasks_done for c in stats) == 400
                and sorted(c["tasks_done"] for c in pool["consumers"]) == sorted(c.tasks_done for c in stats)
            )

        wait_until(shown, timeout=20, interval=0.3)


def test_a_consumer_pool_closed_as_it_finishes_its_tasks_leaves_them_all_in_the_totals(
    dash_cluster: LocalCluster, dash_client: Client
) -> None:
    # Reviewer 24: closed at once after its last tasks, a ConsumerPool's consumers were told gone
    # with the counts of their last report (up to a second old): status read completed 0 of 200.
    http = _http(dash_cluster)
    with QueuePool(dash_client, 1, name="closed-fast") as queue_pool:
        consumers = ConsumerPool(dash_client, queue_pool, n_consumers=2, start=True)
        assert queue_pool.batch_submit([(add, i, 1) for i in range(200)], batch_size=20).result(timeout=60)
        consumers.close()

        def counted() -> bool:
            pool = json.loads(_get(f"{http}/zdq/status.json"))["pools"].get("closed-fast")
            return pool is not None and pool["consumers"] == [] and pool["totals"]["completed"] == 200

        wait_until(counted, timeout=20, interval=0.3)

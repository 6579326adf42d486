"""Pools made with an asynchronous Dask client (issue 24, section 3): ``await QueuePool(client, n)``,
``await ConsumerPool(...)``, ``await queue_pool.submit(fib, n)`` as the result, closing by ``await``
and ``async with``, web handlers (aiohttp, tornado) serving concurrent requests with the event
loop's lag measured, and a TypeError saying what to do for what an asynchronous pool refuses.

Each test runs its coroutine in ``asyncio.run`` against the session's LocalCluster (worker
processes), with every wait bounded by ``asyncio.wait_for``; the ``client`` fixture checks at the
end that no zdq actor or thread is left.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from distributed import Client, LocalCluster

from tests.async_tasks import fib
import zdq
from zdq import ConsumerPool, QueuePool

T = TypeVar("T")

#: Bound of every await on the cluster (placing, closing); generous for a loaded machine.
BOUND = 60.0
#: Most the event loop may lag behind a 10 ms ticker while requests are served. A call that
#: blocked the loop would lag it for the whole call (placing a pool takes seconds); the suite runs
#: four tests at once on two cores beside worker processes, where scheduling alone costs 0.1-0.3 s,
#: and up to 0.52 s seen beside a CPU-bound process.
MAX_LAG = 1.0


def bounded(awaitable: Awaitable[T], seconds: float = BOUND) -> Awaitable[T]:
    return asyncio.wait_for(awaitable, seconds)


class Ticker:
    """A task that wakes every 10 ms and keeps the worst lateness: how long the loop was blocked."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.max_lag = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.interval)
            self.max_lag = max(self.max_lag, time.monotonic() - before - self.interval)

    def __enter__(self) -> Ticker:
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()


def run(cluster: LocalCluster, body: Callable[[Client], Awaitable[T]], timeout: float = 240.0) -> T:
    """``body(client)`` in a fresh event loop, with an asynchronous client of ``cluster``."""

    async def main() -> T:
        client = await bounded(Client(cluster.scheduler_address, asynchronous=True, set_as_default=False))
        try:
            return await bounded(body(client), timeout)
        finally:
            await bounded(client.close())

    return asyncio.run(main())


async def _pools(client: Client, n_consumers: int = 2, **options: Any) -> tuple[QueuePool, ConsumerPool]:
    queue_pool = await bounded(QueuePool(client, 1, **options))
    try:
        consumers = await bounded(ConsumerPool(client, queue_pool, n_consumers=n_consumers, start=True))
    except BaseException:
        await bounded(queue_pool.close())
        raise
    return queue_pool, consumers


@pytest.mark.cluster
def test_await_pools_and_submit(cluster: LocalCluster, client: Client) -> None:
    async def body(aclient: Client) -> None:
        with Ticker() as ticker:
            queue_pool, consumers = await _pools(aclient)
            try:
                assert queue_pool.client is not aclient  # the pool's own synchronous twin
                assert await bounded(queue_pool.submit(fib, 20)) == 6765
                results = await bounded(asyncio.gather(*(queue_pool.submit(fib, i % 20) for i in range(200))))
                assert results == [fib(i % 20) for i in range(200)]
                await bounded(consumers.join(timeout=BOUND))
                assert consumers.nb_consumed() == 201
                assert await bounded(queue_pool.get_queue_size()) == {queue_pool.queue_names[0]: 0}
                await bounded(consumers.close())
            finally:
                await bounded(queue_pool.close())
        assert queue_pool.closed and consumers.closed
        assert ticker.max_lag < MAX_LAG, f"the event loop lagged {ticker.max_lag:.3f} s"

    run(cluster, body)


@pytest.mark.cluster
def test_async_with_closes(cluster: LocalCluster, client: Client) -> None:
    async def body(aclient: Client) -> None:
        async with QueuePool(aclient, 2) as queue_pool:
            async with ConsumerPool(aclient, queue_pool, n_consumers=1) as consumers:
                await bounded(consumers.start())
                assert await bounded(queue_pool.submit(fib, 10)) == 55
            assert consumers.closed
        assert queue_pool.closed

    run(cluster, body)


@pytest.mark.cluster
def test_the_batch_map_gather_and_control_calls_of_an_asynchronous_pool_are_awaited_off_the_loop(
    cluster: LocalCluster, client: Client
) -> None:
    """Every call of an asynchronous pool that may wait (a full window, the cluster) returns an
    awaitable on the loop: batches, map, gather, insert, statistics, dead letters."""

    async def body(aclient: Client) -> None:
        with Ticker() as ticker:
            queue_pool, consumers = await _pools(aclient, window=1, chunk_size=5)
            try:
                batch = await bounded(queue_pool.batch_submit([(fib, i % 20) for i in range(50)]))
                assert await bounded(batch) == [fib(i % 20) for i in range(50)]
                futures = await bounded(queue_pool.map(fib, [i % 20 for i in range(40)]))
                assert await bounded(queue_pool.gather(futures)) == [fib(i % 20) for i in range(40)]
                assert await bounded(queue_pool.submit_iter((fib, i % 20) for i in range(30))) == 30
                await bounded(queue_pool.wait_drained(timeout=BOUND))
                stats = await bounded(queue_pool.statistics())
                assert stats.missing == {} or not stats.missing, stats
                assert await bounded(queue_pool.dead_letters()) == []
            finally:
                await bounded(consumers.close())
                await bounded(queue_pool.close())
        assert ticker.max_lag < MAX_LAG, f"the event loop lagged {ticker.max_lag:.3f} s"

    run(cluster, body)


@pytest.mark.cluster
def test_full_window_never_blocks_the_loop(cluster: LocalCluster, client: Client) -> None:
    """With chunks of one task and a window of one chunk, most submissions wait for room: off
    the loop, in the order they were made."""

    async def body(aclient: Client) -> None:
        queue_pool = await bounded(QueuePool(aclient, 1, window=1, chunk_size=1))
        try:
            with Ticker() as ticker:
                pending = [queue_pool.submit(fib, i % 15) for i in range(300)]
                assert any(isinstance(p, asyncio.Task) for p in pending), "the window was never full"
                consumers = await bounded(ConsumerPool(aclient, queue_pool, n_consumers=2, start=True))
                results = await bounded(asyncio.gather(*pending))
            assert results == [fib(i % 15) for i in range(300)]
            assert ticker.max_lag < MAX_LAG, f"the event loop lagged {ticker.max_lag:.3f} s"
            # asubmit gives the future (to await again), in the same order, the window full or not
            futures = [await bounded(queue_pool.asubmit(fib, i % 15)) for i in range(50)]
            assert [f.key for f in futures] == sorted(f.key for f in futures)
            assert await bounded(asyncio.gather(*futures)) == [fib(i % 15) for i in range(50)]
        finally:
            await bounded(queue_pool.close())  # closes its ConsumerPools first

    run(cluster, body)


async def _hammer(url: str, ns: list[int]) -> list[dict[str, int]]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=BOUND)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def get(n: int) -> dict[str, int]:
            async with session.get(url, params={"n": str(n)}) as response:
                assert response.status == 200, await response.text()
                answer: dict[str, int] = await response.json()
                return answer

        return await asyncio.gather(*(get(n) for n in ns))


def _check_answers(answers: list[dict[str, int]], ns: list[int]) -> None:
    assert [a["n"] for a in answers] == ns
    assert [a["fib"] for a in answers] == [fib(n) for n in ns]


@pytest.mark.cluster
def test_aiohttp_handler(cluster: LocalCluster, client: Client) -> None:
    web = pytest.importorskip("aiohttp.web")
    ns = [15 + i % 8 for i in range(50)]

    async def body(aclient: Client) -> None:
        queue_pool, consumers = await _pools(aclient)

        async def handler(request: Any) -> Any:
            n = int(request.query["n"])
            return web.json_response({"n": n, "fib": await queue_pool.submit(fib, n)})

        app = web.Application()
        app.router.add_get("/fib", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            with Ticker() as ticker:
                answers = await bounded(_hammer(f"http://127.0.0.1:{port}/fib", ns))
        finally:
            await bounded(runner.cleanup())
            await bounded(consumers.close())
            await bounded(queue_pool.close())
        _check_answers(answers, ns)
        assert ticker.max_lag < MAX_LAG, f"the event loop lagged {ticker.max_lag:.3f} s"

    run(cluster, body)


@pytest.mark.cluster
def test_tornado_handler(cluster: LocalCluster, client: Client) -> None:
    import tornado.web
    from tornado.httpserver import HTTPServer
    from tornado.testing import bind_unused_port

    ns = [15 + i % 8 for i in range(50)]

    async def body(aclient: Client) -> None:
        queue_pool, consumers = await _pools(aclient)

        class Fib(tornado.web.RequestHandler):
            async def get(self) -> None:
                n = int(self.get_argument("n"))
                self.write({"n": n, "fib": await queue_pool.submit(fib, n)})

        sock, port = bind_unused_port()
        server = HTTPServer(tornado.web.Application([(r"/fib", Fib)]))
        server.add_sockets([sock])
        try:
            with Ticker() as ticker:
                answers = await bounded(_hammer(f"http://127.0.0.1:{port}/fib", ns))
        finally:
            server.stop()
            await bounded(server.close_all_connections())
            await bounded(consumers.close())
            await bounded(queue_pool.close())
        _check_answers(answers, ns)
        assert ticker.max_lag < MAX_LAG, f"the event loop lagged {ticker.max_lag:.3f} s"

    run(cluster, body)


@pytest.mark.cluster
def test_type_errors_say_what_to_do(cluster: LocalCluster, client: Client) -> None:
    """What an asynchronous pool refuses: a TypeError naming what to write, never a PlacementError."""

    async def body(aclient: Client) -> None:
        unstarted = QueuePool(aclient, 1)  # not awaited: nothing placed
        with pytest.raises(TypeError, match=r"await QueuePool\(client"):
            unstarted.submit(fib, 3)
        with pytest.raises(TypeError, match="async with"):
            with unstarted:
                pass
        with pytest.raises(TypeError, match=r"await QueuePool\(client"):
            ConsumerPool(aclient, unstarted)
        with pytest.raises(TypeError, match="asynchronous Dask client"):
            QueuePool.attach(aclient, "some-pool")
        with pytest.raises(TypeError, match="takes a synchronous Dask client"):
            zdq.Executor(2, client=aclient)  # nothing placed either
        await bounded(unstarted.close())  # closing one never started is fine
        queue_pool = await bounded(QueuePool(aclient, 1))
        try:
            for make in (queue_pool.executor, lambda: zdq.Executor(queue_pool=queue_pool)):
                with pytest.raises(TypeError, match="takes a synchronous Dask client"):
                    make()
            consumers = ConsumerPool(aclient, queue_pool)  # not awaited: not placed
            with pytest.raises(TypeError, match=r"await ConsumerPool\(client"):
                await bounded(consumers.start())
            with pytest.raises(TypeError, match="async with"):
                with consumers:
                    pass
            assert "not placed yet" in repr(consumers)
            await bounded(consumers.close())
        finally:
            await bounded(queue_pool.close())

    run(cluster, body)


@pytest.mark.cluster
def test_awaiting_a_synchronous_pool_says_to_drop_the_await(client: Client) -> None:
    queue_pool = QueuePool(client, 1)
    try:
        async def body() -> None:
            await queue_pool

        with pytest.raises(TypeError, match="drop the await"):
            asyncio.run(body())
    finally:
        queue_pool.close()


@pytest.mark.cluster
def test_a_failed_await_lets_its_twin_client_go(cluster: LocalCluster, client: Client) -> None:
    """A real placement error is raised by the await, as it is, and the pool's own client closes."""
    from zdq.errors import PlacementError

    async def body(aclient: Client) -> None:
        pool = QueuePool(aclient, 1, workers=["no-such-worker"])
        with pytest.raises(PlacementError, match="no-such-worker|no worker"):
            await bounded(pool)
        assert pool._twin is not None and pool._twin.status == "closed"

    run(cluster, body)


@pytest.mark.cluster
def test_a_tls_cluster_is_reached_with_the_clients_security() -> None:
    """The pool's own client connects with the asynchronous client's security (TLS here)."""
    pytest.importorskip("cryptography", reason="Security.temporary() needs cryptography")
    from distributed.security import Security

    security = Security.temporary()
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, security=security,
        dashboard_address=None, worker_dashboard_address=None,
    ) as cluster:

        async def main() -> None:
            aclient = await bounded(Client(cluster.scheduler_address, security=security, asynchronous=True, set_as_default=False))
            try:
                async with QueuePool(aclient, 1) as queue_pool:
                    assert str(getattr(queue_pool.client.scheduler, "address", "")).startswith("tls://")
                    consumers = await bounded(ConsumerPool(aclient, queue_pool, start=True))
                    assert await bounded(queue_pool.submit(fib, 12)) == 144
                    await bounded(consumers.close())
            finally:
                await bounded(aclient.close())

        asyncio.run(main())

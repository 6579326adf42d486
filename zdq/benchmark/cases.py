"""The benchmark cases behind ``zdq bench``: zdq beside its comparisons, same cluster, same run.

Every case is timed end to end in the driver: from the first submission to the last result.
Comparisons: Dask futures always (``client.map`` + ``gather``, beside zdq's batches and its
``Executor.map``; or ``submit().result()`` for latency), daskqueue 0.2.0 when it is installed, and a bare ZeroMQ pipeline as the ceiling.
zdq's no-op throughput is taken on two paths: the futures path (``batch_submit(...).result()``)
and the path daskqueue's users take (``batch_submit``, ``start``, ``join``, ``results``); its
round trip is set beside a bare brokered ZeroMQ round trip, the floor.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import psutil
from distributed import Client, LocalCluster

from zdq._actor import scheduler_workers
from zdq.benchmark.floor import floor_round_trip
from zdq.benchmark.pipeline import run_pipeline
from zdq.benchmark.results import BenchConfig, CaseResult, percentiles
from zdq.benchmark.tasks import noop, sleep_ms, spin
from zdq.benchmark.timing import delayed_memory, release_lateness
from zdq.names import counted

__all__ = ["BenchConfig", "CaseResult", "run", "format_table", "noop"]


@contextlib.contextmanager
def _client(config: BenchConfig) -> Iterator[Client]:
    if config.scheduler:
        with Client(config.scheduler) as client:
            yield client
        return
    with LocalCluster(
        n_workers=config.workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        worker_dashboard_address=None,
    ) as cluster, Client(cluster) as client:
        yield client


@contextlib.contextmanager
def _pools(client: Client, config: BenchConfig, *, max_concurrency: int = 1, **options: Any) -> Iterator[Any]:
    from zdq import ConsumerPool, QueuePool

    options.setdefault("chunk_size", config.batch_size)
    consumers = options.pop("consumers", config.consumers)
    with QueuePool(client, options.pop("queues", config.queues), keep_results=False, **options) as qp:
        with ConsumerPool(client, qp, n_consumers=consumers, max_concurrency=max_concurrency) as cp:
            cp.start()
            qp.batch_submit([(noop, i) for i in range(1000)]).result(timeout=120)  # warm up
            yield qp


def _time_batches(qp: Any, calls_of: Any, n: int, repeat: int, result: CaseResult) -> CaseResult:
    for _ in range(repeat):
        calls = calls_of(n)
        start = time.perf_counter()
        values = qp.batch_submit(calls).result()
        result.seconds.append(time.perf_counter() - start)
        if len(values) != n:
            raise RuntimeError("benchmark results are incomplete")
    return result


def _noop_calls(n: int) -> list[tuple[Any, ...]]:
    return [(noop, i) for i in range(n)]


# -- cases ------------------------------------------------------------------------------------------
def dask_map(client: Client, fn: Any, args: list[Any], repeat: int, case: str) -> CaseResult:
    result = CaseResult(case, "dask futures (client.map + gather)", len(args))
    client.gather(client.map(fn, args[:20], pure=False))  # warm up
    for _ in range(repeat):
        start = time.perf_counter()
        client.gather(client.map(fn, args, pure=False))
        result.seconds.append(time.perf_counter() - start)
    return result


def zdq_noop(client: Client, config: BenchConfig, system: str = "zdq", **options: Any) -> CaseResult:
    with _pools(client, config, **options) as qp:
        return _time_batches(qp, _noop_calls, config.tasks, config.repeat, CaseResult("no-op", system, config.tasks))


def zdq_noop_alternated(
    client: Client, config: BenchConfig, first: tuple[str, dict[str, Any]], second: tuple[str, dict[str, Any]]
) -> tuple[CaseResult, CaseResult, float]:
    """The futures path on two pools placed side by side, each made with its own options (``first``
    and ``second``: the case's name, then the QueuePool's options), their batches alternated (ABBA:
    each round runs one batch of each, the other first in every other round); and the median over
    rounds of each round's rate of the first / the second.

    What an option costs (authentication, durability) is taken this way: a pair taken moments
    apart sees the same machine; taken a minute apart, with other cases between them, the ratio
    moved with what ran between by more than the option's whole cost (benchmarks/RESULTS.md,
    issue 26's fifth and fourteenth sessions)."""
    cases = CaseResult("no-op", first[0], config.tasks), CaseResult("no-op", second[0], config.tasks)
    with _pools(client, config, **first[1]) as a, _pools(client, config, **second[1]) as b:
        runs = ((a, cases[0]), (b, cases[1]))
        for r in range(config.pairs):
            for qp, case in runs if r % 2 == 0 else runs[::-1]:
                _time_batches(qp, _noop_calls, config.tasks, 1, case)
    ratio = statistics.median(s / f for f, s in zip(cases[0].seconds, cases[1].seconds))
    return cases[0], cases[1], ratio


def zdq_noop_with_and_without_auth(client: Client, config: BenchConfig, system: str) -> tuple[CaseResult, CaseResult, float]:
    """The futures path with authentication (named ``system``) and without, alternated
    (:func:`zdq_noop_alternated`), and what authentication costs: the median over rounds of each
    round's rate with it / without it."""
    return zdq_noop_alternated(client, config, (system, {}), ("zdq without authentication", {"auth": False}))


def zdq_durable_beside_transient(client: Client, config: BenchConfig) -> tuple[CaseResult, float]:
    """The futures path on durable queues (LMDB, synced group commits), its batches alternated with
    those of a transient pool placed beside it (:func:`zdq_noop_alternated`), and what durability
    costs: the median over rounds of each round's durable rate / transient rate. The transient
    batches' seconds are the durable case's ``paired_transient_s``."""
    with tempfile.TemporaryDirectory(prefix="zdq-bench-") as dirpath:
        durable, transient, ratio = zdq_noop_alternated(
            client,
            config,
            ("zdq durable (LMDB, synced)", {"durability": "durable", "dirpath": dirpath}),
            ("zdq futures path, paired with durable", {}),
        )
    durable.extra["paired_transient_s"] = transient.seconds
    return durable, ratio


def _paired_with_the_futures_path(qp: Any, config: BenchConfig, run: Callable[[], object], result: CaseResult) -> float:
    """``config.pairs`` timed runs of ``run`` (one map on ``qp``), each paired with a batch of the
    futures path on the same pool (``batch_submit(...).result()`` of ``config.tasks`` no-ops), the
    two alternated (ABBA); the median over pairs of the run's rate / the batch's rate. The
    batches' seconds are the case's ``paired_futures_s``. What ``run`` returns (its futures) is
    dropped after its time is taken, as a batch's values are.

    A map's rate read against the futures path's own case, which ran a minute before with other
    cases between, moved with what ran between: the suite's map ratios spread twofold from run to
    run, where pairs taken moments apart on one pool do not (benchmarks/RESULTS.md, issue 26's
    sixteenth and seventeenth sessions)."""
    beside = CaseResult("no-op", "zdq futures path, paired", config.tasks)
    for r in range(config.pairs):
        if r % 2 == 0:
            _time_batches(qp, _noop_calls, config.tasks, 1, beside)
        start = time.perf_counter()
        kept = run()
        result.seconds.append(time.perf_counter() - start)
        del kept
        if r % 2 == 1:
            _time_batches(qp, _noop_calls, config.tasks, 1, beside)
    result.extra["paired_futures_s"] = beside.seconds
    return statistics.median(
        (result.tasks / m) / (config.tasks / f) for m, f in zip(result.seconds, beside.seconds)
    )


def executor_map(client: Client, config: BenchConfig) -> tuple[CaseResult, float]:
    """``Executor.map`` of a no-op over ``config.n_map`` items (a range, read lazily) with a
    ``buffersize``: one task per item, at most ``buffersize`` unfinished, results taken in order.
    Its comparisons are the no-op case's Dask side, ``client.map`` + ``gather`` (Dask's rate, on
    fewer tasks: a million of its futures would take half an hour), and zdq's futures path (one
    ``batch_submit`` of as many no-ops: issue 26 asks the map at 80 % of it at least), each run
    paired with a batch of it on the same pool (:func:`_paired_with_the_futures_path`); returns the
    case and that ratio."""
    n, buffersize = config.n_map, config.map_buffersize
    result = CaseResult("map", f"zdq Executor.map (buffersize={buffersize:,})", n)
    with _pools(client, config) as qp, qp.executor() as executor:

        def run() -> object:
            count = sum(1 for _ in executor.map(noop, range(n), buffersize=buffersize))
            if count != n:
                raise RuntimeError(f"Executor.map gave {count} results for {n} items")
            return None

        ratio = _paired_with_the_futures_path(qp, config, run, result)
    return result, ratio


def queue_pool_map(client: Client, config: BenchConfig) -> tuple[CaseResult, float]:
    """``queue_pool.map`` of a no-op over ``config.tasks`` items (a range), then every result
    taken from its future: Dask's ``client.map`` + ``gather`` shape, one future per item (which is
    what it returns), so its ratio to the futures path is the price of those futures. Each run is
    paired with a batch of the futures path on the same pool (:func:`_paired_with_the_futures_path`);
    returns the case and that ratio."""
    n = config.tasks
    result = CaseResult("map", "zdq queue_pool.map (a future per item)", n)
    with _pools(client, config) as qp:

        def run() -> object:
            futures = qp.map(noop, range(n))
            count = len([fut.result() for fut in futures])
            if count != n:
                raise RuntimeError(f"queue_pool.map gave {count} results for {n} items")
            return futures

        ratio = _paired_with_the_futures_path(qp, config, run, result)
    return result, ratio


#: ``batch_submit``'s ``batch_size`` on the daskqueue path: the issue's (26) measured user's.
_DASKQUEUE_SUBMIT_BATCH = 10_000
_DASKQUEUE_WARM_UP = 1000


def daskqueue_path(client: Client, config: BenchConfig) -> tuple[CaseResult, float]:
    """The path of a daskqueue user, on zdq: ``QueuePool(client, 1)``, ``ConsumerPool(client, qp,
    n_consumers=2, batch_size=1000)`` (``--consumers``, ``--batch-size``), a prebuilt list of
    ``(noop,)`` calls, ``batch_submit(calls, batch_size=10_000)``, ``start()``, ``join()``,
    ``results()``; timed from the submission to the results in hand.

    Unlike the futures path (:func:`zdq_noop`: ``--queues`` queues, ``keep_results=False``,
    ``batch_submit(...).result()``), the pool keeps its results (the default) and ``join`` watches
    the brokers' counters. Fresh pools for every run (``results()`` gives every result the
    consumers ever produced: one pool would hand back a growing dict), each warmed up by 1,000
    calls on the same path, as the other cases' pools are; so the timed ``results()`` holds those
    1,000 too.

    Also returns the path's rate over the futures path's, measured moments apart: each run is
    paired with a batch of the futures path (its pool placed beside, warm), the two alternated
    (ABBA), and the ratio is the median of the pairs'. Taken against the futures path's own case,
    which ran minutes before with other cases between, the ratio read what ran between (as
    authentication's did: benchmarks/RESULTS.md, issue 26's fifth and twelfth sessions).
    """
    from zdq import ConsumerPool, QueuePool

    n = config.tasks
    calls = [(noop,) for _ in range(n)]  # one tuple each, as a user's: pickle's memo would fold a repeated one
    result = CaseResult("no-op", "zdq daskqueue path (join, results)", n, extra={"queues": 1})
    beside = CaseResult("no-op", "zdq futures path, paired", n)
    phases: list[tuple[float, float, float]] = []
    with _pools(client, config) as futures_pool:
        for r in range(config.pairs):
            if r % 2 == 0:
                _time_batches(futures_pool, _noop_calls, n, 1, beside)
            with QueuePool(client, 1) as qp, ConsumerPool(
                client, qp, n_consumers=config.consumers, batch_size=config.batch_size
            ) as cp:
                _daskqueue_run(qp, cp, [(noop,) for _ in range(_DASKQUEUE_WARM_UP)])
                start = time.perf_counter()
                got, phase = _daskqueue_run(qp, cp, calls)
                result.seconds.append(time.perf_counter() - start)
                phases.append(phase)
            if r % 2 == 1:
                _time_batches(futures_pool, _noop_calls, n, 1, beside)
        if got != n + _DASKQUEUE_WARM_UP:
            raise RuntimeError(
                f"the daskqueue path's results() holds {got} results, not {n} + {_DASKQUEUE_WARM_UP} of the warm-up"
            )
    # Where each run's time went, medians over the runs: results() copies every kept result into
    # fresh dicts, and keeping them cost the driver's I/O thread a dict insertion per task during
    # the run (benchmarks/RESULTS.md, issue 26's sixth session).
    for name, values in zip(("submit_s", "join_s", "results_s"), zip(*phases)):
        result.extra[name] = statistics.median(values)
    result.extra["paired_futures_s"] = beside.seconds
    return result, statistics.median(f / d for d, f in zip(result.seconds, beside.seconds))


def _daskqueue_run(qp: Any, cp: Any, calls: list[tuple[Any, ...]]) -> tuple[int, tuple[float, float, float]]:
    """One pass of the daskqueue user's path: the count of results in hand, and the seconds that
    ``batch_submit``, ``start`` + ``join`` and ``results`` took."""
    t0 = time.perf_counter()
    qp.batch_submit(calls, batch_size=_DASKQUEUE_SUBMIT_BATCH)
    t1 = time.perf_counter()
    cp.start()
    cp.join(timeout=max(120.0, len(calls) / 10_000))  # 10,000 tasks/s would be a broken zdq
    t2 = time.perf_counter()
    got = sum(len(values) for values in cp.results().values())
    return got, (t1 - t0, t2 - t1, time.perf_counter() - t2)


def pipeline_noop(config: BenchConfig) -> CaseResult:
    n = config.tasks  # the same tasks as zdq's runs: a ceiling of the same work
    return CaseResult("no-op", "bare ZeroMQ pipeline (ceiling)", n, run_pipeline(n, config.batch_size, config.repeat))


def daskqueue_noop(client: Client, config: BenchConfig, n: int) -> CaseResult | None:
    if importlib.util.find_spec("daskqueue") is None:
        return None
    from daskqueue import ConsumerPool as DQConsumerPool
    from daskqueue import QueuePool as DQQueuePool

    result = CaseResult("no-op", "daskqueue 0.2.0", n)
    for _ in range(config.repeat):
        qp = DQQueuePool(client, config.queues)
        cp = DQConsumerPool(client, qp, n_consumers=config.consumers, batch_size=config.batch_size)
        cp.start()
        start = time.perf_counter()
        qp.batch_submit([(noop, i) for i in range(n)], batch_size=config.batch_size)
        while cp.nb_consumed() < n:  # daskqueue's join() polls every 2 s: watch the count instead
            time.sleep(0.01)
        result.seconds.append(time.perf_counter() - start)
        cp.cancel()
        del cp, qp
    return result


def relay_round_trip(client: Client, config: BenchConfig) -> CaseResult:
    """The single-task round trip through a relay (300 a run, as :func:`latency` takes zdq's)."""
    runs: list[tuple[float, float]] = []
    with _pools(client, config, relay=True) as qp:
        qp.submit(noop, -1).result()
        for _ in range(config.repeat):
            runs.append(percentiles(_round_trips(lambda i: qp.submit(noop, i).result(), 300)))
    return _latency_result("zdq submit().result() through a relay", runs)


def latency(client: Client, config: BenchConfig) -> tuple[list[CaseResult], dict[str, float]]:
    """Single-task round trip, one at a time, ``config.repeat`` runs of zdq, Dask, then the floor
    (:mod:`~zdq.benchmark.floor`: a bare round trip through a broker process, no pickling), over
    TCP loopback and over ipc (the transport zdq uses to the brokers of its own host).

    Each run takes 300 zdq, 100 Dask and 300 floor round trips and yields each side's p50 and p99;
    the cases report the medians over runs, and each ratio is the median of the per-run ratios
    (each taken from one run, on the same cluster, moments apart). With ``--compare-auth``, each
    run also takes 300 round trips through a pool without CurveZMQ (right after zdq's): what
    authentication costs on this path.
    """
    zdq_runs: list[tuple[float, float]] = []
    plain_runs: list[tuple[float, float]] = []
    dask_runs: list[tuple[float, float]] = []
    floor_runs: list[tuple[float, float]] = []
    ipc_floor_runs: list[tuple[float, float]] = []
    with contextlib.ExitStack() as stack:
        qp = stack.enter_context(_pools(client, config))
        plain = stack.enter_context(_pools(client, config, auth=False)) if config.compare_auth else None
        floor = stack.enter_context(floor_round_trip())
        ipc_floor = stack.enter_context(floor_round_trip(ipc=True))
        for pool in (qp, plain):
            if pool is not None:
                pool.submit(noop, -1).result()
        client.submit(noop, -1, pure=False).result()
        for _ in range(config.repeat):
            zdq_runs.append(percentiles(_round_trips(lambda i: qp.submit(noop, i).result(), 300)))
            if plain is not None:
                plain_runs.append(percentiles(_round_trips(lambda i: plain.submit(noop, i).result(), 300)))
            dask_runs.append(percentiles(_round_trips(lambda i: client.submit(noop, i, pure=False).result(), 100)))
            floor_runs.append(percentiles(_round_trips(floor, 300)))
            ipc_floor_runs.append(percentiles(_round_trips(ipc_floor, 300)))
    cases = [
        _latency_result("zdq submit().result()", zdq_runs),
        _latency_result("dask futures submit().result()", dask_runs),
        _latency_result("bare ZeroMQ via a broker (floor)", floor_runs),
    ]
    ratios = {
        "round trip p50: dask / zdq": statistics.median(d[0] / z[0] for z, d in zip(zdq_runs, dask_runs)),
        "latency_p50_vs_floor": statistics.median(z[0] / f[0] for z, f in zip(zdq_runs, floor_runs)),
        "latency_p99_vs_floor": statistics.median(z[1] / f[1] for z, f in zip(zdq_runs, floor_runs)),
        # zdq reaches the brokers of its own host over ipc (zdq.transport.ipc): the floor of that.
        "latency_p50_vs_ipc_floor": statistics.median(z[0] / f[0] for z, f in zip(zdq_runs, ipc_floor_runs)),
    }
    if plain_runs:
        cases.append(_latency_result("zdq submit().result() without authentication", plain_runs))
        ratios["round trip p50: with auth / without auth"] = statistics.median(
            z[0] / n[0] for z, n in zip(zdq_runs, plain_runs)
        )
    cases.append(_latency_result("bare ZeroMQ via a broker over ipc (floor over Unix sockets)", ipc_floor_runs))
    return cases, ratios


def _round_trips(call: Callable[[int], Any], n: int) -> list[float]:
    samples = []
    for i in range(n):
        start = time.perf_counter()
        call(i)
        samples.append(time.perf_counter() - start)
    return samples


def _latency_result(system: str, runs: list[tuple[float, float]]) -> CaseResult:
    p50 = statistics.median(r[0] for r in runs)
    p99 = statistics.median(r[1] for r in runs)
    extra = {"p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3, "p50_ms_per_run": [round(r[0] * 1e3, 3) for r in runs]}
    return CaseResult("round trip", system, 1, [r[0] for r in runs], extra)


def io_bound(client: Client, config: BenchConfig) -> list[CaseResult]:
    """10,000 tasks sleeping 5 ms; 2 consumers with 100 threads each (default chunks); ideal 0.25 s."""
    n, ms, threads = 10_000, 5.0, 100
    ideal = n * ms / 1000 / (threads * config.consumers)
    with _pools(client, config, max_concurrency=threads) as qp:
        zdq = _time_batches(qp, lambda k: [(sleep_ms, ms)] * k, n, config.repeat, CaseResult("io 5ms", "zdq", n))
    zdq.extra = {"ideal_seconds": ideal, "over_ideal": zdq.median_seconds / ideal}
    dask = dask_map(client, sleep_ms, [ms] * 500, config.repeat, "io 5ms")
    return [zdq, dask]


def cpu_bound(client: Client, config: BenchConfig) -> list[CaseResult]:
    n = 4000
    with _pools(client, config, chunk_size=50) as qp:
        zdq = _time_batches(qp, lambda k: [(spin,)] * k, n, config.repeat, CaseResult("cpu ~1ms", "zdq", n))
    return [zdq, dask_map(client, spin, [20_000] * 1000, config.repeat, "cpu ~1ms")]


def generator(client: Client, config: BenchConfig) -> CaseResult:
    """Ten million tasks from a generator: how much the driver's resident memory grows."""
    n = config.generator_tasks
    proc = psutil.Process()
    with _pools(client, config) as qp:
        gc.collect()
        baseline = proc.memory_info().rss
        peak = [baseline]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], proc.memory_info().rss)

        sampler = threading.Thread(target=sample, name="bench-rss", daemon=True)
        sampler.start()
        start = time.perf_counter()
        qp.submit_iter((noop, i) for i in range(n))
        qp.flush()
        submitted = time.perf_counter() - start
        deadline = time.monotonic() + 3600
        while qp.driver.completed < n + 1000 and time.monotonic() < deadline:
            time.sleep(0.05)
        elapsed = time.perf_counter() - start
        done.set()
        sampler.join()
    growth = (peak[0] - baseline) / 2**20
    return CaseResult(
        "generator", "zdq submit_iter", n, [elapsed], {"rss_growth_mib": growth, "submit_seconds": submitted}
    )


def loop_lag(client: Client, config: BenchConfig, n: int = 1000) -> CaseResult:
    """asyncio: how late the event loop runs a 1 ms timer while ``n`` tasks are submitted with
    ``asubmit`` (one at a time, as a coroutine would) and awaited. p50 and p99 of the lag."""
    import asyncio

    async def one_run(qp: Any) -> tuple[float, list[float]]:
        lags: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                before = loop.time()
                await asyncio.sleep(0.001)
                lags.append(loop.time() - before - 0.001)

        tick = asyncio.create_task(ticker())
        start = time.perf_counter()
        futures = [await qp.asubmit(noop, i) for i in range(n)]
        for future in futures:
            await future
        elapsed = time.perf_counter() - start
        stop.set()
        await tick
        return elapsed, lags

    result = CaseResult("loop lag", f"zdq asubmit + await ({n} tasks)", n)
    p50s, p99s = [], []
    with _pools(client, config) as qp:
        qp.submit(noop, -1).result()
        for _ in range(config.repeat):
            elapsed, lags = asyncio.run(one_run(qp))
            result.seconds.append(elapsed)
            p50, p99 = percentiles(lags)
            p50s.append(p50 * 1000)
            p99s.append(p99 * 1000)
    result.extra = {"lag_p50_ms": statistics.median(p50s), "lag_p99_ms": statistics.median(p99s)}
    return result


def run(config: BenchConfig) -> dict[str, Any]:
    """Run the cases of ``config.suite``; return a JSON-ready report with ratios taken in this run."""
    cases: list[CaseResult] = []
    ratios: dict[str, float] = {}
    with _client(config) as client:
        workers = len(scheduler_workers(client))
        if config.suite == "latency":
            trips, trip_ratios = latency(client, config)
            report = {"config": asdict(config), "workers": workers, "cases": [c.as_dict() for c in trips]}
            return report | {"ratios": trip_ratios}
        if config.suite == "asyncio":
            lag = loop_lag(client, config)
            report = {"config": asdict(config), "workers": workers, "cases": [lag.as_dict()]}
            return report | {"ratios": {"asyncio: loop lag p99 ms (1,000 tasks awaited)": lag.extra["lag_p99_ms"]}}
        if config.suite == "timing":
            timed = _timing_cases(client, config)
            report = {"config": asdict(config), "workers": workers, "cases": [c.as_dict() for c in timed]}
            return report | {"ratios": _timing_ratios(timed)}
        dask = dask_map(client, noop, list(range(config.n_dask)), config.repeat, "no-op")
        full = config.suite == "full"
        plain = None
        if config.compare_auth or full:
            zdq, plain, auth_ratio = zdq_noop_with_and_without_auth(client, config, "zdq futures path (CurveZMQ)")
        else:
            zdq = zdq_noop(client, config, "zdq futures path (CurveZMQ)")
        ceiling = pipeline_noop(config)
        cases += [dask, zdq, ceiling]
        ratios["no-op: zdq / dask futures"] = zdq.rate / dask.rate
        ratios["no-op: zdq / bare pipeline"] = zdq.rate / ceiling.rate
        if full:
            dq = daskqueue_noop(client, config, min(config.tasks, 5000))
            if dq is not None:
                cases.append(dq)
                ratios["no-op: zdq / daskqueue"] = zdq.rate / dq.rate
        if config.durable or full:
            durable, durable_ratio = zdq_durable_beside_transient(client, config)
            cases.append(durable)
            ratios["no-op: durable / transient"] = durable_ratio
        if config.relay:
            relayed = zdq_noop(client, config, "zdq through a relay (relay=True)", relay=True)
            cases.append(relayed)
            ratios["no-op: through a relay / direct"] = relayed.rate / zdq.rate
            trip = relay_round_trip(client, config)
            cases.append(trip)
            ratios["round trip p50 ms through a relay"] = trip.extra["p50_ms"]
        if plain is not None:
            cases.append(plain)
            ratios["no-op: with auth / without auth"] = auth_ratio
        mapped, mapped_paired = executor_map(client, config)
        cases.append(mapped)
        ratios["map: zdq Executor.map / dask futures"] = mapped.rate / dask.rate
        ratios["map: zdq Executor.map / zdq futures path"] = mapped_paired
        dq_path, dq_paired = daskqueue_path(client, config)
        cases.append(dq_path)
        ratios["no-op: zdq daskqueue path / zdq futures path"] = dq_paired
        pool_mapped, pool_mapped_paired = queue_pool_map(client, config)
        cases.append(pool_mapped)
        ratios["map: zdq queue_pool.map / zdq futures path"] = pool_mapped_paired
        if full:
            trips, trip_ratios = latency(client, config)
            cases += trips
            ratios |= trip_ratios
            zi, di = io_bound(client, config)
            cases += [zi, di]
            ratios["io 5ms: zdq time / ideal"] = zi.extra["over_ideal"]
            ratios["io 5ms: zdq / dask futures"] = zi.rate / di.rate
            zc, dc = cpu_bound(client, config)
            cases += [zc, dc]
            ratios["cpu ~1ms: zdq / dask futures"] = zc.rate / dc.rate
            cases.append(generator(client, config))
            lag = loop_lag(client, config)
            cases.append(lag)
            ratios["asyncio: loop lag p99 ms (1,000 tasks awaited)"] = lag.extra["lag_p99_ms"]
            timed = _timing_cases(client, config)
            cases += timed
            ratios |= _timing_ratios(timed)
    return {
        "config": asdict(config),
        "workers": workers,
        "cases": [c.as_dict() for c in cases],
        "ratios": ratios,
    }


def _timing_cases(client: Client, config: BenchConfig) -> list[CaseResult]:
    return [release_lateness(client, config), delayed_memory(client, config)]


def _timing_ratios(timed: list[CaseResult]) -> dict[str, float]:
    release, memory = timed
    return {
        "delayed: release lateness p99 ms (idle pool)": release.extra["late_p99_ms"],
        "delayed: broker bytes per delayed task": memory.extra["bytes_per_delayed_task"],
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'case':<11} {'system':<36} {'tasks':>10} {'median s':>9} {'tasks/s':>12}  notes"]
    for case in report["cases"]:
        notes = ", ".join(
            f"{k}={v:,.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in case["extra"].items()
        )
        lines.append(
            f"{case['case']:<11} {case['system']:<36} {case['tasks']:>10} {case['median_seconds']:>9.3f} "
            f"{case['tasks_per_second']:>12,.0f}  {notes}"
        )
    lines.append("")
    for name, ratio in report["ratios"].items():
        lines.append(f"{name}: {ratio:,.2f}")
    config = report["config"]
    lines.append(
        f"(medians of {counted(config['repeat'], 'run')}, of {counted(config.get('pairs', config['repeat']), 'pair')} for "
        "the cases alternated in pairs, whose ratios are medians of their pairs'; ratios between cases of this run)"
    )
    return "\n".join(lines)

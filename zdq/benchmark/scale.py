"""``zdq bench --suite scale``: what a pool costs as the cluster grows, on one machine.

For each cluster size (2, 8, 16 and 32 workers by default) a fresh LocalCluster is started and a
pool of ``workers / 2`` queues and ``2 × workers`` consumers is placed on it (64 consumers over 16
queues on 32 workers at the top). Measured there:

- **placement**: seconds from ``QueuePool(...)`` to consumers started, and per actor placed;
  beside it, **bare Dask's own**: as many trivial actors placed on the same workers (all at once,
  their proxies fetched in one round trip, as zdq fetches its own) and each called once, which is
  the floor of any design that places Dask actors; and the ratio ``zdq placement / bare Dask``
  per cluster size. Each is taken in ``pairs`` pairs on the same cluster, the two alternated
  (Dask first in the first pair, zdq first in the second...; each zdq pool closed before the next
  placement): the seconds are the medians of their pairs', the ratio the median of the pairs'
  ratios (one placement against one read 1.3-2.5 at 16 workers from run to run);
- **placement CPU** per actor (the first pair's): the CPU time all processes (workers, scheduler
  and client) spend while placing, minus what they burn idle over as long, per actor. On a machine with fewer
  cores than workers, idle workers take a share of the cores that grows with their number, and the
  seconds per actor grow with it; the CPU per actor is the work placing does, whatever is left of
  the machine;
- **throughput**: no-op tasks per second, end to end (``batch_submit`` of ``--tasks`` calls);
- **file descriptors** per worker process, after placement (sockets count);
- **idle CPU** per consumer: the CPU time the workers burn in a quiet interval with the pool
  placed and started, minus what the same workers burn without it, per consumer, as a share of a
  core (bare Dask's own idle cost is measured first, on the same cluster).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import psutil
from distributed import Client, LocalCluster

from zdq._actor import scheduler_workers
from zdq.benchmark.tasks import noop

__all__ = ["SCALES", "ScaleResult", "run_scale", "plot_scale"]

#: Worker counts of the default sweep.
SCALES = (2, 8, 16, 32)
#: Seconds of quiet over which idle CPU is measured.
_IDLE_SECONDS = 5.0


@dataclass
class ScaleResult:
    workers: int
    queues: int
    consumers: int
    placement_seconds: float
    per_actor_seconds: float
    dask_per_actor_seconds: float  # bare Dask: trivial actors placed and called once each
    placement_vs_dask: float  # zdq's placement seconds / bare Dask's, as many actors, same cluster: the pairs' median
    placement_vs_dask_pairs: list[float]  # that ratio in each pair, in the order taken
    cpu_per_actor_seconds: float  # CPU of every process while placing, idle burn removed
    dask_cpu_per_actor_seconds: float
    idle_cores: float  # cores the cluster burns idle (every process), before placing
    tasks: int
    tasks_per_second: float
    fds_per_worker: float
    idle_cpu_per_consumer: float  # share of one core, the pool's own (bare Dask's removed)
    dask_idle_cpu_per_worker: float


def _fds() -> int:
    return psutil.Process().num_fds()


def _cpu_seconds() -> float:
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


def _idle_cpu(client: Client, seconds: float) -> float:
    """CPU seconds all workers spend over ``seconds`` of quiet (summed)."""
    before = client.run(_cpu_seconds)
    time.sleep(seconds)
    after = client.run(_cpu_seconds)
    return sum(after[w] - before[w] for w in after if w in before)


def _all_cpu(client: Client) -> float:
    """CPU seconds every worker and this process (client and scheduler) used so far."""
    return sum(client.run(_cpu_seconds).values()) + _cpu_seconds()


class _CpuMeter:
    """CPU spent by every process over a span, minus their idle burn over as long."""

    def __init__(self, client: Client, idle_cores: float) -> None:
        self.client, self.idle_cores = client, idle_cores

    def begin(self) -> _CpuMeter:
        self.cpu, self.start = _all_cpu(self.client), time.perf_counter()
        return self

    def end(self) -> None:
        self.seconds = time.perf_counter() - self.start
        self.spent = max(0.0, _all_cpu(self.client) - self.cpu - self.idle_cores * self.seconds)

    def __enter__(self) -> _CpuMeter:
        return self.begin()

    def __exit__(self, *exc: object) -> None:
        self.end()


class _Idle:
    """The least actor there is: what placing one costs in Dask alone."""

    def ping(self) -> int:
        return 1


@contextlib.contextmanager
def placement_cluster(workers: int) -> Iterator[Client]:
    """A LocalCluster of ``workers`` one-thread worker processes and its client, every worker up
    and settled: what the suite and the placement probes (``benchmarks/placement_*.py``) measure on."""
    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
            worker_dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(workers, timeout=300)
        time.sleep(1.0)  # workers settle after start
        yield client


def _dask_placement(client: Client, n: int, one_by_one: bool = False) -> float:
    """Seconds to place ``n`` trivial actors over the workers (in parallel) and call each once;
    ``one_by_one``: their proxies fetched one ``result()`` at a time (the floor before issue 26)."""
    workers = sorted(scheduler_workers(client))
    start = time.perf_counter()
    futures = [
        client.submit(_Idle, actor=True, workers=[workers[i % len(workers)]], pure=False, key=f"bench-idle-{i}-{time.time_ns()}")
        for i in range(n)
    ]
    # The proxies in one round trip for all, as zdq fetches its own (one result() each, one after
    # the other, cost a round trip per actor that zdq does not pay: the floor would not be one).
    actors: list[Any] = (  # proxies: ping() returns a future
        [f.result(timeout=300) for f in futures] if one_by_one else client.gather(futures)
    )
    assert all(call.result(timeout=300) == 1 for call in [a.ping() for a in actors])
    took = time.perf_counter() - start
    del actors
    for f in futures:
        f.release()
    return took


def _zdq_placement(client: Client, queues: int, consumers: int, overrides: dict[str, Any]) -> float:
    """Seconds to place a pool of ``queues`` queues and ``consumers`` consumers, started (as
    :func:`one_scale` times its first); the pool is closed after, outside the time."""
    from zdq import ConsumerPool, QueuePool

    start = time.perf_counter()
    with QueuePool(client, queues, keep_results=False, **overrides) as qp:
        with ConsumerPool(client, qp, n_consumers=consumers, start=True, **overrides):
            took = time.perf_counter() - start
    return took


def one_scale(
    workers: int, tasks: int, fan_out: int | None = None, idle_seconds: float = _IDLE_SECONDS, pairs: int = 1
) -> ScaleResult:
    from zdq import ConsumerPool, QueuePool

    if pairs < 1:
        raise ValueError(f"the scale suite's placements are taken in pairs: at least 1, not {pairs}")
    queues, consumers = max(1, workers // 2), 2 * workers
    overrides: dict[str, Any] = {} if fan_out is None else {"fan_out": fan_out}
    with placement_cluster(workers) as client:
        dask_idle = _idle_cpu(client, idle_seconds) / idle_seconds / workers
        before = _all_cpu(client)
        time.sleep(idle_seconds)
        idle_cores = (_all_cpu(client) - before) / idle_seconds
        with _CpuMeter(client, idle_cores) as dask_cpu:
            dask_placement = _dask_placement(client, queues + consumers)
        time.sleep(1.0)
        placing = _CpuMeter(client, idle_cores).begin()
        with QueuePool(client, queues, keep_results=False, **overrides) as qp:
            with ConsumerPool(client, qp, n_consumers=consumers, start=True, **overrides):
                placing.end()  # consumers started: what follows is not placement
                placement = placing.seconds
                fds = client.run(_fds)
                qp.batch_submit([(noop, i) for i in range(1000)]).result(timeout=300)  # warm up
                t0 = time.perf_counter()
                qp.batch_submit([(noop, i) for i in range(tasks)]).result(timeout=600)
                rate = tasks / (time.perf_counter() - t0)
                time.sleep(1.0)
                idle = _idle_cpu(client, idle_seconds) / idle_seconds
        # The other pairs, alternated: zdq first in the second, Dask first in the third...
        taken = [(placement, dask_placement)]
        for r in range(1, pairs):
            time.sleep(0.5)
            if r % 2:
                z = _zdq_placement(client, queues, consumers, overrides)
                time.sleep(0.5)
                d = _dask_placement(client, queues + consumers)
            else:
                d = _dask_placement(client, queues + consumers)
                time.sleep(0.5)
                z = _zdq_placement(client, queues, consumers, overrides)
            taken.append((z, d))
    own = max(0.0, idle - dask_idle * workers) / consumers
    zdq_seconds = statistics.median(z for z, _ in taken)
    dask_seconds = statistics.median(d for _, d in taken)
    ratios = [z / d for z, d in taken]
    return ScaleResult(
        workers=workers,
        queues=queues,
        consumers=consumers,
        placement_seconds=zdq_seconds,
        per_actor_seconds=zdq_seconds / (queues + consumers),
        dask_per_actor_seconds=dask_seconds / (queues + consumers),
        placement_vs_dask=statistics.median(ratios),
        placement_vs_dask_pairs=ratios,
        cpu_per_actor_seconds=placing.spent / (queues + consumers),
        dask_cpu_per_actor_seconds=dask_cpu.spent / (queues + consumers),
        idle_cores=idle_cores,
        tasks=tasks,
        tasks_per_second=rate,
        fds_per_worker=sum(fds.values()) / len(fds),
        idle_cpu_per_consumer=own,
        dask_idle_cpu_per_worker=dask_idle,
    )


def run_scale(
    tasks: int,
    scales: tuple[int, ...] = SCALES,
    fan_out: int | None = None,
    idle_seconds: float = _IDLE_SECONDS,
    pairs: int = 1,
) -> dict[str, Any]:
    """Each scale in turn; ``idle_seconds``: how long each idle CPU figure is measured over;
    ``pairs``: placements of zdq and bare Dask, alternated, at each scale (see the module)."""
    results = [one_scale(w, tasks, fan_out, idle_seconds, pairs) for w in scales]
    report: dict[str, Any] = {"scales": [asdict(r) for r in results]}
    by_size = {r.workers: r for r in results}
    for r in results:  # issue 26, point 7: within 2x of bare Dask's
        report[f"placement zdq / bare Dask, {r.workers} workers"] = r.placement_vs_dask
        if len(r.placement_vs_dask_pairs) > 1:
            told = ", ".join(f"{x:.2f}" for x in r.placement_vs_dask_pairs)
            report[f"  its {len(r.placement_vs_dask_pairs)} pairs, {r.workers} workers"] = told
    if 16 in by_size and 32 in by_size:
        report["per actor: 32 workers / 16 workers"] = by_size[32].per_actor_seconds / by_size[16].per_actor_seconds
        report["bare Dask per actor: 32 workers / 16 workers"] = (
            by_size[32].dask_per_actor_seconds / by_size[16].dask_per_actor_seconds
        )
        report["CPU per actor: 32 workers / 16 workers"] = (
            by_size[32].cpu_per_actor_seconds / by_size[16].cpu_per_actor_seconds
        )
        report["bare Dask CPU per actor: 32 workers / 16 workers"] = (
            by_size[32].dask_cpu_per_actor_seconds / by_size[16].dask_cpu_per_actor_seconds
        )
    return report


def format_scale(report: dict[str, Any]) -> str:
    lines = [
        f"{'workers':>7} {'queues':>6} {'consumers':>9} {'placement s':>11} {'per actor s':>11} {'Dask alone':>10} "
        f"{'CPU/actor ms':>12} {'Dask alone':>10} {'idle cores':>10} "
        f"{'tasks/s':>11} {'fds/worker':>10} {'idle CPU/consumer':>17}"
    ]
    for r in report["scales"]:
        lines.append(
            f"{r['workers']:>7} {r['queues']:>6} {r['consumers']:>9} {r['placement_seconds']:>11.2f} "
            f"{r['per_actor_seconds']:>11.3f} {r['dask_per_actor_seconds']:>10.3f} "
            f"{r['cpu_per_actor_seconds'] * 1000:>12.1f} {r['dask_cpu_per_actor_seconds'] * 1000:>10.1f} {r['idle_cores']:>10.2f} "
            f"{r['tasks_per_second']:>11,.0f} {r['fds_per_worker']:>10.0f} "
            f"{r['idle_cpu_per_consumer'] * 100:>16.2f}%"
        )
    for key, value in report.items():
        if key != "scales":
            lines.append(f"{key}: {value:.2f}" if isinstance(value, float) else f"{key}: {value}")
    return "\n".join(lines)


def plot_scale(report: dict[str, Any], directory: str) -> str | None:
    """Placement per actor and throughput against workers; the PNG's path, or None (and a
    warning naming the ``bench`` extra) without matplotlib."""
    from zdq.benchmark.plots import pyplot_or_none

    plt = pyplot_or_none()
    if plt is None:
        return None
    os.makedirs(directory, exist_ok=True)
    rows = report["scales"]
    xs = [r["workers"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(xs, [r["per_actor_seconds"] * 1000 for r in rows], marker="o", label="zdq (placed and started)")
    left.plot(xs, [r["dask_per_actor_seconds"] * 1000 for r in rows], marker="s", label="bare Dask (trivial actors)")
    left.legend()
    left.set_xlabel("workers (queues = workers / 2, consumers = 2 × workers)")
    left.set_ylabel("placement, ms per actor")
    left.grid(True, alpha=0.3)
    right.plot(xs, [r["tasks_per_second"] for r in rows], marker="o")
    right.set_xlabel("workers")
    right.set_ylabel("no-op tasks/s, end to end")
    right.grid(True, alpha=0.3)
    fig.suptitle("zdq on one machine as the cluster grows")
    fig.tight_layout()
    path = os.path.join(directory, "scale.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

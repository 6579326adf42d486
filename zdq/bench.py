"""The throughput benchmark behind ``zdq bench``: zdq and Dask futures, same cluster, same run.

Each case is timed end to end, from the first submission to the last result in the driver.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from distributed import Client, LocalCluster

__all__ = ["BenchConfig", "CaseResult", "noop", "run"]


def noop(x: Any = None) -> Any:
    """The task of the no-op cases: returns its argument."""
    return x


@dataclass(frozen=True)
class BenchConfig:
    tasks: int = 200_000
    dask_tasks: int | None = None
    queues: int = 2
    consumers: int = 2
    batch_size: int = 1000
    workers: int = 2
    scheduler: str | None = None
    repeat: int = 3
    durable: bool = False
    compare_auth: bool = False

    def __post_init__(self) -> None:
        for name in ("tasks", "queues", "consumers", "batch_size", "workers", "repeat"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")

    @property
    def n_dask(self) -> int:
        # Dask runs about 500 no-op tasks/s here: a few thousand measure its rate without taking minutes.
        return self.dask_tasks if self.dask_tasks is not None else min(self.tasks, 5000)


@dataclass
class CaseResult:
    name: str
    tasks: int
    seconds: list[float] = field(default_factory=list)

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rate(self) -> float:
        return self.tasks / self.median_seconds

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "median_seconds": self.median_seconds, "tasks_per_second": self.rate}


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


def _dask_case(client: Client, n: int, repeat: int) -> CaseResult:
    result = CaseResult("dask futures (client.map + gather)", n)
    client.gather(client.map(noop, range(100), pure=False))  # warm up
    for _ in range(repeat):
        start = time.perf_counter()
        futures = client.map(noop, range(n), pure=False)
        client.gather(futures)
        result.seconds.append(time.perf_counter() - start)
        del futures
    return result


def _zdq_case(client: Client, config: BenchConfig, name: str, **pool_options: Any) -> CaseResult:
    from zdq import ConsumerPool, QueuePool

    result = CaseResult(name, config.tasks)
    with QueuePool(client, config.queues, keep_results=False, chunk_size=config.batch_size, **pool_options) as qp:
        with ConsumerPool(client, qp, n_consumers=config.consumers) as consumers:
            consumers.start()
            qp.batch_submit([(noop, i) for i in range(1000)]).result(timeout=60)  # warm up
            for _ in range(config.repeat):
                calls = [(noop, i) for i in range(config.tasks)]
                start = time.perf_counter()
                values = qp.batch_submit(calls).result()
                result.seconds.append(time.perf_counter() - start)
                if len(values) != config.tasks or values[-1] != config.tasks - 1:
                    raise RuntimeError("benchmark results are incomplete")
    return result


def run(config: BenchConfig) -> dict[str, Any]:
    """Run the no-op cases; return a JSON-ready report with the ratios taken in this run."""
    ratios: dict[str, float] = {}
    with _client(config) as client:
        workers = len(client.scheduler_info(n_workers=-1)["workers"])
        dask = _dask_case(client, config.n_dask, config.repeat)
        zdq = _zdq_case(client, config, "zdq end to end (CurveZMQ, batch_submit -> results)")
        cases = [dask, zdq]
        ratios["zdq / dask futures"] = zdq.rate / dask.rate
        if config.durable:
            with tempfile.TemporaryDirectory(prefix="zdq-bench-") as dirpath:
                durable = _zdq_case(
                    client, config, "zdq durable (LMDB, synced)", durability="durable", dirpath=dirpath
                )
            cases.append(durable)
            ratios["durable / transient"] = durable.rate / zdq.rate
        if config.compare_auth:
            plain = _zdq_case(client, config, "zdq without authentication (auth=False)", auth=False)
            cases.append(plain)
            ratios["with auth / without auth"] = zdq.rate / plain.rate
    return {
        "config": asdict(config),
        "workers": workers,
        "cases": [c.as_dict() for c in cases],
        "ratios": ratios,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'case':<52} {'tasks':>9} {'median s':>9} {'tasks/s':>12}"]
    for case in report["cases"]:
        lines.append(
            f"{case['name']:<52} {case['tasks']:>9} {case['median_seconds']:>9.3f} {case['tasks_per_second']:>12,.0f}"
        )
    for name, ratio in report["ratios"].items():
        lines.append(f"{name}: {ratio:,.2f}x")
    lines.append(f"(medians of {report['config']['repeat']} runs, ratios between medians of this run)")
    return "\n".join(lines)

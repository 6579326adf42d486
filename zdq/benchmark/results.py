"""The benchmark's shared types: a run's configuration, a case's result, percentiles.

Every suite module (:mod:`~zdq.benchmark.cases`, :mod:`~zdq.benchmark.timing`, ...) imports these
from here, and none imports another suite for them: no import circle between the suites.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["BenchConfig", "CaseResult", "percentiles"]


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
    # Pairs of each alternated comparison (an option's cost, a path against the futures path):
    # their ratios are medians over this many pairs. Three spread the ratio of one tree's runs
    # over a fifth (benchmarks/RESULTS.md, issue 26's seventeenth and eighteenth sessions).
    pairs: int = 7
    durable: bool = False
    compare_auth: bool = False
    relay: bool = False  # also run zdq through a relay (relay=True): throughput and round trip
    # "quick": no-op throughput; "latency": the round trip alone; "asyncio": the event loop's lag
    # while tasks are awaited; "timing": delayed tasks' release lateness and memory; "full": every case
    suite: str = "quick"
    generator_tasks: int = 10_000_000
    delayed_tasks: int = 1_000_000
    # Items of the map case (Executor.map with a buffersize); default 5 x tasks (1,000,000 at
    # the default 200,000 tasks).
    map_tasks: int | None = None

    def __post_init__(self) -> None:
        for name in ("tasks", "queues", "consumers", "batch_size", "workers", "repeat", "pairs", "generator_tasks", "delayed_tasks"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.map_tasks is not None and self.map_tasks < 1:
            raise ValueError("--map-tasks must be at least 1")
        if self.suite not in ("quick", "latency", "asyncio", "timing", "full"):
            raise ValueError("--suite must be 'quick', 'latency', 'asyncio', 'timing' or 'full'")

    @property
    def n_dask(self) -> int:
        # Dask runs about 500 no-op tasks/s here: a few thousand measure its rate without taking minutes.
        return self.dask_tasks if self.dask_tasks is not None else min(self.tasks, 5000)

    @property
    def n_map(self) -> int:
        return self.map_tasks if self.map_tasks is not None else 5 * self.tasks

    @property
    def map_buffersize(self) -> int:
        # Ten chunks a consumer: the window keeps every consumer busy, the driver's memory flat.
        return 10 * self.batch_size * self.consumers


@dataclass
class CaseResult:
    case: str
    system: str
    tasks: int
    seconds: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rate(self) -> float:
        return self.tasks / self.median_seconds

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "median_seconds": self.median_seconds, "tasks_per_second": self.rate}


def percentiles(samples: list[float]) -> tuple[float, float]:
    """The p50 and p99 of ``samples`` (nearest rank, no interpolation)."""
    ordered = sorted(samples)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]

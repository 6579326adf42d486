"""What a hard time limit costs per task: no limit, a soft limit, a hard one (``hard=True``).

Not part of ``zdq bench`` (a small script, run by hand)::

    python benchmarks/hard_limit_cost.py [--tasks 2000] [--repeat 3]

One worker process with one thread, one queue, one consumer. Each case queues ``--tasks`` no-op
calls ``(abs, i)`` (a builtin: pickled by reference to the child, as a function of an importable
module is; a function of ``__main__`` would be pickled by value for every task) in one ``batch_submit`` (the options travel once, with the chunks) and waits
for every result; the time from the submission to the last result, divided by the tasks, is the
cost per task (the median of ``--repeat`` runs). Also timed: a hard task that finds no warm child
(the first one, and the first after a kill), which pays for starting one.
"""

from __future__ import annotations

import argparse
import statistics
import time

from distributed import Client, LocalCluster

from zdq import ConsumerPool, QueuePool


def _timed_batch(queue_pool: QueuePool, n: int, **options: object) -> float:
    started = time.perf_counter()
    queue_pool.batch_submit([(abs, i) for i in range(n)], **options).result(timeout=600)
    return time.perf_counter() - started


def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cases = {"none": {}, "soft": {"time_limit": 60}, "hard": {"time_limit": 60, "hard": True}}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client, QueuePool(client, 1) as queue_pool:
            with ConsumerPool(client, queue_pool, n_consumers=1, start=True):
                queue_pool.submit(abs, 0).result(timeout=60)  # placed and connected
                started = time.perf_counter()
                queue_pool.submit(abs, 0, time_limit=60, hard=True).result(timeout=60)
                cold = time.perf_counter() - started
                times: dict[str, list[float]] = {name: [] for name in cases}
                for _ in range(args.repeat):
                    for name, options in cases.items():  # alternated: a slow spell hits every case
                        times[name].append(_timed_batch(queue_pool, args.tasks, **options))
                queue_pool.submit(_sleep, 60, time_limit=0.2, hard=True).exception(timeout=60)  # kills the child
                started = time.perf_counter()
                queue_pool.submit(abs, 0, time_limit=60, hard=True).result(timeout=60)
                after_kill = time.perf_counter() - started
    base = statistics.median(times["none"]) / args.tasks
    print(f"{args.tasks} no-op tasks in one batch, median of {args.repeat} runs, 1 consumer:")
    for name, runs in times.items():
        per_task = statistics.median(runs) / args.tasks
        print(f"  {name:5s} {per_task * 1e6:9.1f} µs/task   {1 / per_task:9.0f} tasks/s   +{(per_task - base) * 1e6:8.1f} µs")
    print(f"  a hard task with no warm child (start one): first {cold * 1e3:.0f} ms, after a kill {after_kill * 1e3:.0f} ms")


if __name__ == "__main__":
    main()

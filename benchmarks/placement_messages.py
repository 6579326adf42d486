"""How many Dask messages placing a pool costs per actor, beside bare Dask (issue 26, point 7).

``PYTHONPATH=$PWD python3 benchmarks/placement_messages.py WORKERS``: on a LocalCluster of WORKERS
processes, counts every message the scheduler, the workers and the client handle (request handlers
and batched-stream handlers, by operation: the handler tables are wrapped, nothing else changes)
while bare Dask places its ``workers / 2 + 2 × workers`` trivial actors (as ``zdq bench --suite
scale``), then while ``QueuePool(client, workers / 2)`` and ``ConsumerPool(..., 2 × workers,
start=True)`` are placed. Prints the messages per actor placed, by where and operation. A count,
not a time: the machine's load does not change it.
"""

from __future__ import annotations

import collections
import functools
import inspect
import sys
import time
from typing import Any

from distributed import Client, LocalCluster

from zdq import ConsumerPool, QueuePool
from zdq.benchmark.scale import _dask_placement

_CLIENT_COUNTS: collections.Counter[str] = collections.Counter()


def _count_handlers(dask_worker: Any = None, dask_scheduler: Any = None) -> None:
    """Wrap this server's handler tables (once) so that each message handled is counted, in a
    counter kept on the server (functions sent by ``client.run`` carry copies of their globals)."""
    server = dask_worker or dask_scheduler
    if not hasattr(server, "_zdq_counts"):
        server._zdq_counts = collections.Counter()
    counts = server._zdq_counts
    # Called again after the first round: handlers added since (the zdq monitor's, installed by
    # the first pool: the feeds' asks and reports) are counted too.
    for table_name, kind in (("handlers", "rpc"), ("stream_handlers", "stream")):
        table = getattr(server, table_name)
        for op, handler in list(table.items()):
            if not getattr(handler, "_zdq_counted", False):
                table[op] = _counted(counts, f"{kind}:{op}", handler)


def _counted(counts: collections.Counter[str], label: str, handler: Any) -> Any:
    """``handler``, counting its calls; a coroutine function stays one (Dask awaits those)."""
    if inspect.iscoroutinefunction(handler):

        @functools.wraps(handler)
        async def counting(*args: Any, **kwargs: Any) -> Any:
            counts[label] += 1
            return await handler(*args, **kwargs)

        counting._zdq_counted = True  # type: ignore[attr-defined]
        return counting

    @functools.wraps(handler)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counts[label] += 1
        return handler(*args, **kwargs)

    wrapper._zdq_counted = True  # type: ignore[attr-defined]
    return wrapper


def _take(dask_worker: Any = None, dask_scheduler: Any = None) -> dict[str, int]:
    counts = (dask_worker or dask_scheduler)._zdq_counts
    out = dict(counts)
    counts.clear()
    return out


def _client_counting(client: Client) -> None:
    for op, handler in list(client._stream_handlers.items()):
        client._stream_handlers[op] = _counted(_CLIENT_COUNTS, f"stream:{op}", handler)


def taken(client: Client) -> collections.Counter[str]:
    total: collections.Counter[str] = collections.Counter()
    total.update({f"scheduler {k}": v for k, v in client.run_on_scheduler(_take).items()})
    for counts in client.run(_take).values():
        total.update({f"worker {k}": v for k, v in counts.items()})
    total.update({f"client {k}": v for k, v in _CLIENT_COUNTS.items()})
    _CLIENT_COUNTS.clear()
    # The counting's own messages (run, run_on_scheduler, their replies) are not placement's.
    for k in [k for k in total if k.endswith((":run", ":run_function", ":broadcast", ":proxy"))]:
        del total[k]
    return total


def show(label: str, counts: collections.Counter[str], actors: int) -> None:
    print(f"{label}: {sum(counts.values())} messages, {sum(counts.values()) / actors:.2f} per actor", flush=True)
    for k, v in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"   {k:45s} {v:5d}  {v / actors:.2f}/actor", flush=True)


def main(n: int) -> None:
    with (
        LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None, worker_dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(n, timeout=300)
        client.run(_count_handlers)
        client.run_on_scheduler(_count_handlers)
        _client_counting(client)
        q, c = max(1, n // 2), 2 * n
        for _ in range(2):  # the first round warms up (connections, imports, the monitor installed)
            time.sleep(1)
            client.run(_count_handlers)
            client.run_on_scheduler(_count_handlers)
            taken(client)
            _dask_placement(client, q + c)
            time.sleep(1)
            dask = taken(client)
            with (
                QueuePool(client, q, keep_results=False) as qp,
                ConsumerPool(client, qp, n_consumers=c, start=True),
            ):
                time.sleep(0.2)
                zdq = taken(client)
            time.sleep(1)
        show("bare Dask", dask, q + c)
        show("zdq", zdq, q + c)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)

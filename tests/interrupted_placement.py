"""Run by tests/test_placement.py: a ConsumerPool(...) interrupted by Ctrl-C while it places its
consumers, on a LocalCluster of this process; prints (JSON) what the workers still hold after
the queue pool's close(): zdq's threads and Dask actors, per worker, and the actors the scheduler
lists, waited for (up to ``SECONDS`` seconds) to be none.

    python -m tests.interrupted_placement DELAY SECONDS
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time


def _held(dask_worker: object) -> tuple[int, int]:
    names = [t.name for t in threading.enumerate()]
    return sum(n.startswith("zdq-") for n in names), len(dask_worker.state.actors)  # type: ignore[attr-defined]


def _listed(dask_scheduler: object) -> int:
    return sum(len(ws.actors) for ws in dask_scheduler.workers.values())  # type: ignore[attr-defined]


def _slow_consumer_class() -> type:
    """A consumer class made in 0.25 s: 16 of them take a couple of seconds on two single-thread
    workers, so that the interrupt falls inside the placement on any host (with zdq's own class,
    a quiet host placed all 16 before it)."""
    import zdq

    class SlowToMake(zdq.GeneralConsumer):
        def __init__(self, *args: object, **kwargs: object) -> None:
            time.sleep(0.25)
            super().__init__(*args, **kwargs)

    return SlowToMake


def main(delay: float, seconds: float) -> None:
    import faulthandler

    faulthandler.dump_traceback_later(150, exit=True)
    from distributed import Client, LocalCluster

    import zdq

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(
        cluster
    ) as client:
        queue_pool = zdq.QueuePool(client, 1)
        interrupt = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
        interrupt.start()
        outcome = "placed"
        try:
            consumers = zdq.ConsumerPool(client, queue_pool, _slow_consumer_class(), n_consumers=16, start=True)
            interrupt.cancel()
            consumers.close()
        except KeyboardInterrupt:
            outcome = "interrupted"
        queue_pool.close()
        deadline = time.monotonic() + seconds
        while True:
            held = {address: list(v) for address, v in client.run(_held).items()}
            listed = client.run_on_scheduler(_listed)
            if not (listed or any(threads or actors for threads, actors in held.values())) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        print(json.dumps({"outcome": outcome, "held": held, "listed": listed}))


if __name__ == "__main__":
    main(float(sys.argv[1]), float(sys.argv[2]))

"""The ceiling: a bare two-process ZeroMQ pipeline with no queue logic at all.

The driver pickles batches of ``(noop, i)`` calls and PUSHes them to one executor process, which
unpickles, runs and pickles the results back on another PUSH/PULL pair. No storage, no leases, no
credit, no authentication: the fastest a Python process can push no-op tasks through ZeroMQ here.
"""

from __future__ import annotations

import multiprocessing
import pickle
import time

import zmq

from zdq.benchmark.tasks import noop

__all__ = ["run_pipeline"]


def _executor(tasks_endpoint: str, results_endpoint: str) -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(tasks_endpoint)
    push = ctx.socket(zmq.PUSH)
    push.connect(results_endpoint)
    try:
        while True:
            msg = pull.recv()
            if not msg:
                return
            calls = pickle.loads(msg)
            push.send(pickle.dumps([c[0](*c[1:]) for c in calls], protocol=5))
    finally:
        pull.close(linger=0)
        push.close(linger=0)
        ctx.term()


def run_pipeline(n: int, batch: int = 1000, repeat: int = 3) -> list[float]:
    """Seconds to push ``n`` no-op tasks through the bare pipeline, ``repeat`` times."""
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    pull = ctx.socket(zmq.PULL)
    tasks_port = push.bind_to_random_port("tcp://127.0.0.1")
    results_port = pull.bind_to_random_port("tcp://127.0.0.1")
    proc = multiprocessing.get_context("spawn").Process(
        target=_executor, args=(f"tcp://127.0.0.1:{tasks_port}", f"tcp://127.0.0.1:{results_port}"), daemon=True
    )
    proc.start()
    seconds = []
    try:
        # Warm up: the executor process starts and connects before anything is timed (zdq's
        # pools are placed and warmed up before their runs too).
        push.send(pickle.dumps([(noop, -1)], protocol=5))
        pull.recv()
        for _ in range(repeat):
            calls = [(noop, i) for i in range(n)]
            start = time.perf_counter()
            in_flight = got = 0
            sent = 0
            while got < n:
                # Keep a few batches in flight, as any sane pipeline would.
                while sent < n and in_flight < 8:
                    push.send(pickle.dumps(calls[sent : sent + batch], protocol=5))
                    sent += batch
                    in_flight += 1
                got += len(pickle.loads(pull.recv()))
                in_flight -= 1
            seconds.append(time.perf_counter() - start)
    finally:
        push.send(b"")
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()
    return seconds

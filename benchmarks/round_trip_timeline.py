"""Where a lone task's round trip goes: a timeline across the driver's and the workers' threads.

``zdq bench --suite latency`` gives the round trip's p50 and its floor; :mod:`hop_cpu` gives each
thread's CPU per round trip. Neither says which of that CPU lies on the round trip's path, nor what
lies between the hops. This script stamps, in every process (CLOCK_MONOTONIC, which all processes
of a host share), each thread's wake-up from its poll, the start and the end of each message it
sends (every frame's send releases the interpreter lock in pyzmq), the caller's wake of the driver
and its ``result()``; then prints, for the most common sequences of those events, the median time
of each from the ``submit`` call, and the step from the one before.

The layout is the latency suite's (2 workers x 1 thread, 2 queues, 2 consumers with
``max_concurrency=1``, CurveZMQ on); round trips are spaced by 2 ms so that each starts idle.

    python3 benchmarks/round_trip_timeline.py [N] [--perf SECONDS]

``--perf``: record the scheduler's switches and wake-ups of the whole machine with ``perf record
-k CLOCK_MONOTONIC`` for SECONDS during the run (root, Linux ``perf``), and print three round trips
with the switches laid between the events: which thread ran on which core, and who waited for
whom (libzmq's I/O threads show by their ``ZMQbg`` names).

Stamping costs a few microseconds an event; compare steps with one another, not with the suite.
Used for issue 26 point 4 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import bisect
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

_KEY = "_ROUND_TRIP_EVENTS"


def _install() -> int:
    """Stamp this process's zdq threads (idempotent): poll wake-ups, sends, wakes and results."""
    import threading

    import zmq

    import zdq
    import zdq.broker.core as core
    import zdq.futures as futures
    import zdq.transport.sockets as sockets

    if _KEY in zdq.__dict__:
        return os.getpid()
    events: list[tuple[int, str, str]] = zdq.__dict__.setdefault(_KEY, [])
    stamp, current, native = time.perf_counter_ns, threading.current_thread, threading.get_native_id

    def who() -> str:
        return f"{current().name}|{native()}"

    real_poll = zmq.zmq_poll

    def poll(socks: Any, timeout: int = -1) -> Any:
        ready = real_poll(socks, timeout)
        if ready and timeout != 0:
            events.append((stamp(), who(), "woke"))
        return ready

    zmq.zmq_poll = poll
    core._poll = poll
    more = int(zmq.SNDMORE)
    for module, name in ((sockets, "_send"), (core, "_send_frame")):
        def send(sock: Any, data: Any, flags: int = 0, copy: bool = True, track: bool = False, _real: Any = getattr(module, name)) -> Any:
            if flags & more:
                events.append((stamp(), who(), "frame"))
            sent = _real(sock, data, flags, copy=copy)
            if not flags & more:
                events.append((stamp(), who(), "sent"))
            return sent

        setattr(module, name, send)
    wake, result = sockets.Waker.wake, futures.TaskFuture.result

    def stamped_wake(self: Any) -> None:
        events.append((stamp(), who(), "wake()"))
        wake(self)

    def stamped_result(self: Any, timeout: float | None = None) -> Any:
        events.append((stamp(), who(), "result()"))
        return result(self, timeout)

    sockets.Waker.wake = stamped_wake  # type: ignore[method-assign]
    futures.TaskFuture.result = stamped_result  # type: ignore[method-assign]
    return os.getpid()


def _events() -> list[tuple[int, str, str]]:
    import zdq

    return list(zdq.__dict__.get(_KEY, []))


def _clear() -> None:
    import zdq

    zdq.__dict__.get(_KEY, []).clear()


def _role(thread: str) -> str:
    name = thread.split("|")[0]
    for part, role in (("broker", "broker"), ("consumer", "consumer"), ("driver", "driver I/O"), ("MainThread", "caller")):
        if part in name:
            return role
    return ""


def _run(n: int, perf_seconds: float) -> tuple[list[tuple[int, int]], list[tuple[int, str, str]], str | None]:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(_install)
        _install()
        from zdq import ConsumerPool, QueuePool
        from zdq.benchmark.tasks import noop

        with QueuePool(client, 2, keep_results=False, chunk_size=1000) as qp, ConsumerPool(client, qp, n_consumers=2, max_concurrency=1) as cp:
            cp.start()
            for i in range(300):
                qp.submit(noop, i).result(timeout=30)
            client.run(_clear)
            _clear()
            perf = perf_file = None
            if perf_seconds:
                perf_file = os.path.join(tempfile.mkdtemp(prefix="zdq-timeline-"), "perf.data")
                perf = subprocess.Popen(
                    ["perf", "record", "-q", "-e", "sched:sched_switch", "-e", "sched:sched_wakeup", "-k", "CLOCK_MONOTONIC",
                     "-a", "-o", perf_file, "--", "sleep", str(perf_seconds)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                time.sleep(0.5)  # perf's start
            spans = []
            for i in range(n):
                start = time.perf_counter_ns()
                qp.submit(noop, i).result(timeout=30)
                spans.append((start, time.perf_counter_ns()))
                time.sleep(0.002)
            if perf is not None:
                perf.wait(timeout=perf_seconds + 60)
            events = _events()
            for more in client.run(_events).values():
                events += more
    events.sort()
    return spans, events, perf_file


def _sequences(spans: list[tuple[int, int]], events: list[tuple[int, str, str]]) -> None:
    times = [e[0] for e in events]
    counts: collections.Counter[tuple[tuple[str, str], ...]] = collections.Counter()
    offsets: dict[tuple[tuple[str, str], ...], list[list[float]]] = collections.defaultdict(list)
    for start, end in spans:
        steps = [(t, _role(who), what) for t, who, what in events[bisect.bisect_left(times, start) : bisect.bisect_right(times, end)]]
        steps = [s for s in steps if s[1]]
        key = tuple((role, what) for _, role, what in steps)
        counts[key] += 1
        offsets[key].append([(t - start) / 1e3 for t, _, _ in steps] + [(end - start) / 1e3])
    print(f"{len(spans)} round trips, p50 {statistics.median((e - s) / 1e3 for s, e in spans):.1f} us")
    for key, count in counts.most_common(3):
        rows = offsets[key]
        medians = [statistics.median(r[j] for r in rows) for j in range(len(rows[0]))]
        print(f"\n{count} round trips in this order (median us from submit(), and the step):")
        before = 0.0
        for (role, what), at in zip(list(key) + [("caller", "returned")], medians):
            print(f"  {at:7.1f}  +{at - before:6.1f}  {role:10s} {what}")
            before = at


def _with_switches(spans: list[tuple[int, int]], events: list[tuple[int, str, str]], perf_file: str) -> None:
    names = {int(who.split("|")[1]): who.split("|")[0][:24] for _, who, _ in events}
    text = subprocess.run(["perf", "script", "-i", perf_file, "-F", "tid,cpu,time,event,trace"], capture_output=True, text=True, timeout=300).stdout
    lines: list[tuple[int, str]] = []
    for line in text.splitlines():
        m = re.match(r"\s*(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+sched:(\w+):\s+(.*)", line)
        if not m:
            continue
        at, cpu, kind, rest = int(round(float(m[3]) * 1e9)), m[2], m[4], m[5]
        if kind == "sched_switch":
            s = re.search(r"prev_pid=(\d+).*prev_state=(\S+) ==> next_comm=(\S+) next_pid=(\d+)", rest)
            if s:
                prev, state, nxt = names.get(int(s[1]), s[1]), s[2], names.get(int(s[4]), f"{s[3]}:{s[4]}")
                lines.append((at, f"[cpu{cpu}] {prev} ({state}) -> {nxt}"))
        else:
            s = re.search(r"comm=(\S+) pid=(\d+)", rest)
            if s:
                lines.append((at, f"[cpu{cpu}] wakes {names.get(int(s[2]), f'{s[1]}:{s[2]}')}"))
    if not lines:
        print("perf recorded nothing (is perf installed, and are you root?)")
        return
    first, last = lines[0][0], lines[-1][0]
    merged = sorted(lines + [(t, f"    {who.split('|')[0][:24]}: {what}") for t, who, what in events])
    times = [m[0] for m in merged]
    inside = [s for s in spans if first < s[0] and s[1] < last]
    for start, end in inside[len(inside) // 2 : len(inside) // 2 + 3]:
        print(f"\n==== a round trip of {(end - start) / 1e3:.1f} us")
        for at, what in merged[bisect.bisect_left(times, start) : bisect.bisect_right(times, end)]:
            print(f"{(at - start) / 1e3:8.1f} {what}")


def main() -> None:
    args = sys.argv[1:]
    perf_seconds = 0.0
    if "--perf" in args:
        i = args.index("--perf")
        perf_seconds = float(args[i + 1])
        del args[i : i + 2]
    n = int(args[0]) if args else 1000
    spans, events, perf_file = _run(n, perf_seconds)
    _sequences(spans, events)
    if perf_file:
        _with_switches(spans, events, perf_file)
    if os.environ.get("TIMELINE_JSON"):
        with open(os.environ["TIMELINE_JSON"], "w") as f:
            json.dump({"spans": spans, "events": events}, f)


if __name__ == "__main__":
    main()

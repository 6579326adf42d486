"""CPU per single-task round trip, per thread, in the latency suite's layout (issue 26 point 4).

    python3 benchmarks/hop_cpu.py [N] [--profile]
    python3 benchmarks/hop_cpu.py --pairs OLD_TREE NEW_TREE PAIRS [N]

A LocalCluster of 2 workers x 1 thread, 2 queues, 2 consumers with ``max_concurrency=1`` (``zdq
bench --suite latency``'s layout); N (3,000) ``submit(noop, i).result()`` one at a time. Each
thread's CPU is read before and after with ``clock_gettime(pthread_getcpuclockid(thread))`` (ns,
in its own process, through ``client.run``): what each zdq thread (the driver's I/O thread and
caller, each broker loop, each consumer's socket owner, libzmq's I/O threads) spends per round
trip, and the wall p50. ``--profile`` also runs cProfile inside each broker loop and each consumer's
socket owner (installed before placement) and prints the top functions by tottime per round trip
and the function calls per round trip. ``--pairs`` alternates two trees (ABBA), fresh processes
(a side may be ``TREE@NAME=VALUE``: an environment variable set for it).

Environment switches of a run: ``HOP_OPCODES=1`` counts the Python bytecodes and calls of those
loops per round trip, by function (``sys.settrace`` opcode events: a measure load does not move);
``HOP_TAIL=1`` runs 300 at a time, 0.35 s apart, and lays the monitoring feed's work (reports built,
sent, handled by the scheduler) over each block's slowest round trips; ``HOP_PERF=FILE`` records the
workers with ``perf record -g`` meanwhile (FILE.threads.json names their threads);
``HOP_TAKEOVER=S`` sets the consumers' ``zdq.consumer.link._TAKEOVER``. Used for issue 26 point 4
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any


def _thread_cpu() -> dict[str, float]:
    """Every thread of this process: its CPU seconds, by name (libzmq's threads by /proc comm)."""
    import threading

    out: dict[str, float] = {}
    seen: set[int] = set()
    for t in threading.enumerate():
        if t.ident is None:
            continue
        try:
            out[t.name] = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
            seen.add(t.native_id or 0)
        except OSError:
            pass
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        if int(tid) in seen:
            continue
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                raw = f.read()
            comm = raw[raw.index("(") + 1 : raw.rindex(")")]
            fields = raw[raw.rindex(")") + 2 :].split()
            out[f"{comm}#{tid}"] = (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return out


def _set_takeover(seconds: float) -> None:
    import zdq.consumer.link as link

    link._TAKEOVER = seconds


def _thread_ids() -> dict[int, str]:
    import threading

    return {t.native_id: t.name for t in threading.enumerate() if t.native_id}


def _install_feed_trace() -> None:
    """Timestamps (CLOCK_MONOTONIC) of the monitoring feed's work in this process: each report
    built (``feed._report``, on ``zdq-feed``), each handed to the worker's loop (``feed._send``),
    and, in the scheduler's process, each report handled (``Monitor.on_report``)."""
    import zdq.observe.feed as feed
    import zdq.observe.monitor as monitor

    events = sys.modules[__name__].__dict__.setdefault("FEED_EVENTS", [])

    def timed(label: str, fn: Any) -> Any:
        if getattr(fn, "_timed", False):
            return fn

        def run(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                events.append((label, start, time.perf_counter()))

        run._timed = True  # type: ignore[attr-defined]
        return run

    feed._report = timed("report built", feed._report)
    feed._send = timed("report sent", feed._send)
    monitor.Monitor.on_report = timed("report handled", monitor.Monitor.on_report)


def _feed_events() -> list[tuple[str, float, float]]:
    return list(sys.modules[__name__].__dict__.get("FEED_EVENTS", []))


def _install_opcode_count() -> None:
    """Count the Python bytecodes (and Python calls) each broker loop and consumer socket owner
    started from now on executes: a measure of their Python work that load does not move."""
    import threading

    import zdq.broker.core as core
    import zdq.consumer.link as link

    counts = sys.modules[__name__].__dict__.setdefault("OPCODES", {})

    def wrap(cls: type, name: str, role: str) -> None:
        original = getattr(cls, name)
        if getattr(original, "_counted", False):
            return

        def run(self, *a, **k):  # type: ignore[no-untyped-def]
            tally = counts.setdefault(f"{role}-{threading.current_thread().name}", [0, 0])
            by_code = sys.modules[__name__].__dict__.setdefault("BY_CODE", {})

            def local(frame, event, arg):  # type: ignore[no-untyped-def]
                if event == "opcode":
                    tally[0] += 1
                    code = frame.f_code
                    key = (role, code.co_filename.rsplit("/", 2)[-2:], code.co_firstlineno, code.co_name)
                    key = (role, "/".join(key[1]), key[2], key[3])
                    by_code[key] = by_code.get(key, 0) + 1
                return local

            def trace(frame, event, arg):  # type: ignore[no-untyped-def]
                tally[1] += 1
                frame.f_trace_opcodes = True
                return local

            sys.settrace(trace)
            try:
                return original(self, *a, **k)
            finally:
                sys.settrace(None)

        run._counted = True  # type: ignore[attr-defined]
        setattr(cls, name, run)

    wrap(core.BrokerCore, "_run", "broker")
    wrap(link.Link, "_serve", "consumer")


def _by_code() -> dict[str, int]:
    return {f"{r} {f}:{line} {name}": n for (r, f, line, name), n in sys.modules[__name__].__dict__.get("BY_CODE", {}).items()}


def _opcode_counts() -> dict[str, list[int]]:
    return {k: list(v) for k, v in sys.modules[__name__].__dict__.get("OPCODES", {}).items()}


def _install_profiler() -> None:
    """cProfile inside each broker loop and each consumer socket owner started from now on."""
    import cProfile

    import zdq.broker.core as core
    import zdq.consumer.link as link

    profiles = sys.modules[__name__].__dict__.setdefault("PROFILES", {})

    def wrap(cls: type, name: str) -> None:
        original = getattr(cls, name)
        if getattr(original, "_wrapped", False):
            return

        def run(self, *a, **k):  # type: ignore[no-untyped-def]
            prof = cProfile.Profile()
            import threading
            profiles[f"{cls.__name__}.{name}-{id(self)}-{threading.current_thread().name}"] = prof
            prof.enable()
            try:
                return original(self, *a, **k)
            finally:
                prof.disable()

        run._wrapped = True  # type: ignore[attr-defined]
        setattr(cls, name, run)

    wrap(core.BrokerCore, "_run")
    wrap(link.Link, "_serve")


def _raw(prof: Any) -> dict[Any, tuple[int, float, float]]:
    """A profile's counts so far, by function: (calls, tottime, cumtime); read without stopping it
    (``disable()`` from another thread would move it there)."""
    out: dict[Any, tuple[int, float, float]] = {}
    for e in prof.getstats():
        code = e.code
        key = (code.co_filename, code.co_firstlineno, code.co_name) if hasattr(code, "co_filename") else ("~", 0, str(code))
        c, t, ct = out.get(key, (0, 0.0, 0.0))
        out[key] = (c + e.callcount, t + e.inlinetime, ct + e.totaltime)
    return out


def _reset_profiles() -> None:
    mod = sys.modules[__name__].__dict__
    mod["BASE"] = {key: _raw(prof) for key, prof in mod.get("PROFILES", {}).items()}


def _profile_text(n: int) -> str:
    mod = sys.modules[__name__].__dict__
    out = io.StringIO()
    for key, prof in mod.get("PROFILES", {}).items():
        base = mod.get("BASE", {}).get(key, {})
        rows = []
        for fn, (c, t, ct) in _raw(prof).items():
            c0, t0, ct0 = base.get(fn, (0, 0.0, 0.0))
            if c - c0:
                rows.append((fn, c - c0, t - t0, ct - ct0))
        out.write(f"== {key}: {sum(r[1] for r in rows) / n:.1f} function calls per round trip\n")
        for (file, line, name), c, t, ct in sorted(rows, key=lambda r: -r[2])[:45]:
            out.write(f"  {c / n:6.2f}/rt tottime {t / n * 1e6:6.1f} us/rt  cum {ct / n * 1e6:7.1f}  {os.path.basename(file)}:{line} {name}\n")
    return out.getvalue()


def _side(n: int, profile: bool) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from distributed import Client, LocalCluster

    from zdq import ConsumerPool, QueuePool
    from zdq.benchmark.tasks import noop

    here = os.path.dirname(os.path.abspath(__file__))
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, worker_dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        def add_path(path: str = here) -> None:
            if path not in sys.path:
                sys.path.insert(0, path)

        client.run(add_path)
        import hop_cpu  # noqa: F401 - importable by the workers too

        if profile:
            client.run(hop_cpu._install_profiler)
        takeover = os.environ.get("HOP_TAKEOVER")
        if takeover:  # how often each consumer's standby thread wakes (zdq.consumer.link._TAKEOVER)
            client.run(hop_cpu._set_takeover, float(takeover))
        opcodes = os.environ.get("HOP_OPCODES")
        if opcodes:
            client.run(hop_cpu._install_opcode_count)
        tail = os.environ.get("HOP_TAIL")
        if tail:
            client.run(hop_cpu._install_feed_trace)
            hop_cpu._install_feed_trace()
        with (
            QueuePool(client, 2, keep_results=False) as qp,
            ConsumerPool(client, qp, n_consumers=2, max_concurrency=1) as cp,
        ):
            cp.start()
            qp.batch_submit([(noop, i) for i in range(1000)]).result(timeout=120)
            for i in range(300):
                qp.submit(noop, i).result(timeout=10)
            if profile:
                client.run(hop_cpu._reset_profiles)
            perf = None
            if os.environ.get("HOP_PERF"):  # perf record of the workers during the timed round trips
                pids = client.run(os.getpid)
                names = client.run(hop_cpu._thread_ids)
                with open(os.environ["HOP_PERF"] + ".threads.json", "w") as f:
                    json.dump({str(pids[a]): names[a] for a in pids}, f)
                perf = subprocess.Popen(["perf", "record", "-q", "-F", "4999", "-g", "-o", os.environ["HOP_PERF"],
                                         "-p", ",".join(str(v) for v in pids.values())], stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            ops0 = client.run(hop_cpu._opcode_counts) if opcodes else {}
            code0 = client.run(hop_cpu._by_code) if opcodes else {}
            before_w = client.run(hop_cpu._thread_cpu)
            before_d = hop_cpu._thread_cpu()
            samples = []
            spans = []
            for i in range(n):
                start = time.perf_counter()
                qp.submit(noop, i).result(timeout=10)
                end = time.perf_counter()
                samples.append(end - start)
                spans.append((start, end))
                if tail and i % 300 == 299:
                    time.sleep(0.35)  # the latency suite's Dask and floor runs between zdq's runs
            if tail:
                events = hop_cpu._feed_events() + [e for v in client.run(hop_cpu._feed_events).values() for e in v]
                _tail_report(spans, events)
            after_d = hop_cpu._thread_cpu()
            after_w = client.run(hop_cpu._thread_cpu)
            if perf is not None:
                import signal
                perf.send_signal(signal.SIGINT)
                perf.wait(timeout=60)
            prof = client.run(hop_cpu._profile_text, n) if profile else {}
            if opcodes:
                ops1 = client.run(hop_cpu._opcode_counts)
                total: dict[str, list[float]] = {}
                for addr, counts in ops1.items():
                    for key, (ops, calls) in counts.items():
                        o0, c0 = ops0[addr].get(key, (0, 0))
                        role = key.split("-", 1)[0]
                        t = total.setdefault(role, [0.0, 0.0])
                        t[0] += (ops - o0) / n
                        t[1] += (calls - c0) / n
                prof = {"opcodes": "\n".join(f"{r}: {o:.0f} bytecodes, {c:.1f} Python calls per round trip" for r, (o, c) in sorted(total.items()))}
                code1 = client.run(hop_cpu._by_code)
                per_code: dict[str, float] = {}
                for addr, counts in code1.items():
                    for key, v in counts.items():
                        per_code[key] = per_code.get(key, 0.0) + (v - code0[addr].get(key, 0)) / n
                prof["by function"] = "\n".join(f"{v:7.1f} {k}" for k, v in sorted(per_code.items(), key=lambda kv: -kv[1]) if v >= 3)
    per: dict[str, float] = {}

    def add(where: str, before: dict[str, float], after: dict[str, float]) -> None:
        for name, t in after.items():
            d = (t - before.get(name, 0.0)) / n * 1e6
            if d >= 1.0:
                per[f"{where}:{name}"] = d

    add("driver", before_d, after_d)
    for k, (addr, after) in enumerate(sorted(after_w.items())):
        add(f"w{k}", before_w[addr], after)
    samples.sort()
    print(json.dumps({"p50_ms": samples[len(samples) // 2] * 1e3, "p99_ms": samples[int(len(samples) * 0.99)] * 1e3,
                      "cpu_us": per, "profile": prof}))


def _tail_report(spans: list[tuple[float, float]], events: list[tuple[str, float, float]]) -> None:
    """Per block of 300 (a latency run): p99, and whether its slowest round trips overlapped the
    feed's work (within 0.1 ms)."""
    lines = []
    overlapped = total = 0
    for b in range(0, len(spans), 300):
        block = spans[b : b + 300]
        times = sorted(e - s for s, e in block)
        p99 = times[int(len(times) * 0.99)]
        slow = [(s, e) for s, e in block if e - s >= p99]
        hits = []
        for s, e in slow:
            near = [lab for lab, a, z in events if a < e + 1e-4 and z > s - 1e-4]
            hits.append(",".join(sorted(set(near))) or "-")
        in_block = [lab for lab, a, z in events if block[0][0] <= a <= block[-1][1]]
        overlapped += sum(h != "-" for h in hits)
        total += len(hits)
        lines.append(f"block p50 {times[len(times)//2]*1e3:.3f} p99 {p99*1e3:.3f} ms; feed events in block {len(in_block)}; slowest: "
                     + "; ".join(f"{(e - s) * 1e3:.2f} ms {h}" for (s, e), h in zip(slow, hits)))
    durations: dict[str, list[float]] = {}
    for lab, a, z in events:
        durations.setdefault(lab, []).append((z - a) * 1e3)
    for lab, ds in sorted(durations.items()):
        lines.append(f"{lab}: {len(ds)} events, median {statistics.median(ds):.3f} ms, max {max(ds):.3f} ms")
    lines.append(f"slowest 1% overlapping feed work: {overlapped} of {total}")
    print("\n".join(lines), file=sys.stderr)


def _group(per: dict[str, float]) -> dict[str, float]:
    """Per round trip, by role: the two brokers' loops add up (each serves the round trips of its
    queue), so do the consumers' socket owners and standbys."""
    g: dict[str, float] = {}
    for key, us in per.items():
        name = key.split(":", 1)[1]
        role = (
            "broker" if name.startswith("zdq-broker") else
            # The consumer's socket owner: either of its two threads (they trade places, see
            # zdq.consumer.link.Handover).
            "consumer" if name.startswith(("zdq-consumer", "zdq-standby")) else
            "driver I/O" if key.startswith("driver:") and name.startswith("zdq-") else
            "caller" if key == "driver:MainThread" else
            "libzmq (driver)" if key.startswith("driver:") and name.startswith("ZMQ") else
            "libzmq (workers)" if name.startswith("ZMQ") else
            ("driver other" if key.startswith("driver:") else "worker other")
        )
        g[role] = g.get(role, 0.0) + us
    return g


def _run(side: str, n: int, profile: bool = False) -> dict:
    """One side in a fresh process: ``TREE``, or ``TREE@NAME=VALUE`` to set an environment
    variable for it (``@DASK_ZDQ__REPORT_INTERVAL=None``: the same tree without the feed)."""
    tree, _, setting = side.partition("@")
    env = {**os.environ, "PYTHONPATH": tree}
    if setting:
        name, _, value = setting.partition("=")
        env[name] = value
    args = [sys.executable, os.path.abspath(__file__), "--side", str(n)] + (["--profile"] if profile else [])
    out = subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True, timeout=600, check=True)
    if os.environ.get("HOP_TAIL"):
        print("\n".join(l for l in out.stderr.splitlines() if l.startswith(("block", "report", "slowest"))))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] == "--side":
        _side(int(argv[1]), "--profile" in argv)
        return
    if argv and argv[0] == "--pairs":
        old, new, pairs = argv[1], argv[2], int(argv[3])
        n = int(argv[4]) if len(argv) > 4 else 3000
        got: dict[str, list[dict]] = {old: [], new: []}
        for k in range(pairs):
            for tree in (old, new) if k % 2 == 0 else (new, old):
                r = _run(tree, n)
                got[tree].append(r)
                g = _group(r["cpu_us"])
                print(f"{'new' if tree == new else 'old'} load {os.getloadavg()[0]:.1f} p50 {r['p50_ms']:.3f} p99 "
                      f"{r['p99_ms']:.3f} ms; " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(g.items())), flush=True)
        roles = sorted({k for rs in got.values() for r in rs for k in _group(r["cpu_us"])})
        for role in roles + ["p50_ms"]:
            ratios = []
            for a, b in zip(got[old], got[new]):
                va = a["p50_ms"] if role == "p50_ms" else _group(a["cpu_us"]).get(role, 0.0)
                vb = b["p50_ms"] if role == "p50_ms" else _group(b["cpu_us"]).get(role, 0.0)
                if va:
                    ratios.append(vb / va)
            med_a = statistics.median(a["p50_ms"] if role == "p50_ms" else _group(a["cpu_us"]).get(role, 0.0) for a in got[old])
            med_b = statistics.median(b["p50_ms"] if role == "p50_ms" else _group(b["cpu_us"]).get(role, 0.0) for b in got[new])
            if ratios:
                print(f"{role:18s} old {med_a:8.1f} new {med_b:8.1f}  new/old median {statistics.median(ratios):.3f} "
                      f"({', '.join(f'{x:.2f}' for x in ratios)})")
        return
    n = int(argv[0]) if argv and not argv[0].startswith("-") else 3000
    r = _run(os.getcwd(), n, "--profile" in argv)
    print(f"p50 {r['p50_ms']:.3f} ms p99 {r['p99_ms']:.3f} ms, load {os.getloadavg()[0]:.1f}")
    for key, us in sorted(r["cpu_us"].items(), key=lambda kv: -kv[1]):
        print(f"  {us:7.1f} us/rt  {key}")
    for role, us in sorted(_group(r["cpu_us"]).items()):
        print(f"  {role:18s} {us:7.1f} us/rt")
    for addr, text in r["profile"].items():
        print(addr)
        print(text)


if __name__ == "__main__":
    main()

"""The ``zdq`` command. The only place where zdq configures logging."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors exit with ``usage_status``: 2 as argparse's, but
    ``zdq result`` gives 2 a meaning of its own (pending, started or unknown), so that a script
    looping while it is 2 is not kept looping by a mistake in its own command line."""

    def __init__(self, *args: Any, usage_status: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.usage_status = usage_status

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(self.usage_status, f"{self.prog}: error: {message}\n")


def _bench(args: argparse.Namespace) -> int:
    from zdq.benchmark import BenchConfig, format_table, run

    if args.suite == "scale":
        return _bench_scale(args)
    if args.suite == "monitor":
        return _bench_monitor(args)

    config = BenchConfig(
        tasks=args.tasks,
        dask_tasks=args.dask_tasks,
        queues=args.queues or 2,
        consumers=args.consumers,
        batch_size=args.batch_size,
        workers=args.workers,
        scheduler=args.scheduler,
        repeat=args.repeat,
        pairs=args.pairs,
        durable=args.durable,
        compare_auth=args.compare_auth,
        relay=args.relay,
        suite=args.suite,
        generator_tasks=args.generator_tasks,
        delayed_tasks=args.delayed_tasks,
        map_tasks=args.map_tasks,
    )
    report = run(config)
    if args.plots:
        from zdq.benchmark.plots import sweep_and_plot

        report["sweeps"] = sweep_and_plot(config, args.plots)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def _bench_scale(args: argparse.Namespace) -> int:
    from zdq.benchmark.scale import SCALES, format_scale, plot_scale, run_scale

    scales = tuple(int(w) for w in args.scale_workers.split(",")) if args.scale_workers else SCALES
    if not scales or min(scales) < 1:
        raise ValueError("--scale-workers takes worker counts, like 2,8,16,32")
    if not 0 < args.idle_seconds < 3600:
        raise ValueError("--idle-seconds must be between 0 and 3600 seconds")
    if args.pairs < 1:
        raise ValueError("--pairs must be at least 1")
    report = run_scale(args.tasks, scales, args.fan_out, args.idle_seconds, args.pairs)
    if args.plots:
        report["plot"] = plot_scale(report, args.plots)
    print(json.dumps(report, indent=2) if args.json else format_scale(report))
    return 0


def _bench_monitor(args: argparse.Namespace) -> int:
    from zdq.benchmark.monitor import format_monitor, run_monitor

    report = run_monitor(args.queues or 100, args.consumers, args.workers, args.tasks)
    print(json.dumps(report, indent=2) if args.json else format_monitor(report))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import os

    from zdq.errors import StorageCorrupt
    from zdq.names import queue_name_of, sorted_by_name
    from zdq.storage.lmdb import inspect_queue, is_queue_dir

    root = args.dirpath
    if not os.path.isdir(root):  # a failure of the command, as a directory without queues is: status 1
        why = "is not a directory" if os.path.exists(root) else "does not exist"
        print(f"zdq inspect: {root} {why}", file=sys.stderr)
        return 1
    paths = [root] if is_queue_dir(root) else sorted_by_name(
        os.path.join(root, n) for n in os.listdir(root) if is_queue_dir(os.path.join(root, n))
    )
    if not paths:
        print(f"zdq inspect: no zdq queue in {root}", file=sys.stderr)
        return 1
    reports, status = [], 0
    for path in paths:
        try:
            reports.append(inspect_queue(path))
        except StorageCorrupt as e:
            reports.append({"name": queue_name_of(path), "path": path, "error": str(e)})
            status = 1
    if args.json:
        print(json.dumps(reports, indent=2))
        return status
    print(f"{'queue':<40} {'ready':>10} {'delayed':>10} {'leased':>10} {'dead':>8} {'schedules':>9} {'size':>12}")
    for r in reports:
        name = r["name"]  # as its pool shows it (repr, get_queue_size(), statistics)
        if "error" in r:
            print(f"{name:<40} error: {r['error']}")
        else:
            print(
                f"{name:<40} {r['ready_tasks']:>10} {r['delayed_tasks']:>10} {r['leased_tasks']:>10} {r['dead_tasks']:>8} "
                f"{r['schedules']:>9} "
                f"{int(r['size_bytes']) / 2**20:>10.1f}MiB"
            )
    return status


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("zdq")
    except PackageNotFoundError:  # run from a checkout
        from zdq import __version__

        return __version__


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="zdq", description="zdq: a ZeroMQ task queue on Dask")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    parser.add_argument("--version", action="version", version=f"zdq {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="no-op throughput of zdq and of Dask futures, same cluster, same run")
    bench.add_argument("--tasks", type=int, default=200_000, help="zdq tasks per run (default 200000)")
    bench.add_argument("--dask-tasks", type=int, default=None, help="Dask futures per run (default min(tasks, 5000))")
    bench.add_argument("--queues", type=int, default=None, help="queues (brokers), default 2 (monitor suite: 100)")
    bench.add_argument("--consumers", type=int, default=2, help="consumers, default 2")
    bench.add_argument("--batch-size", type=int, default=1000, help="tasks per chunk, default 1000")
    bench.add_argument("--workers", type=int, default=2, help="workers of the embedded cluster, default 2")
    bench.add_argument("--scheduler", metavar="ADDRESS", default=None, help="use this cluster instead of an embedded one")
    bench.add_argument("--repeat", type=int, default=3, help="runs per case; medians are reported (default 3)")
    bench.add_argument(
        "--pairs", type=int, default=7,
        help=(
            "pairs of each alternated comparison (durable and without authentication against the futures path, "
            "the maps and the daskqueue path each beside a batch of it; the scale suite's placements of zdq and "
            "bare Dask); each ratio is the median of its pairs' (default 7)"
        ),
    )
    bench.add_argument("--durable", action="store_true", help="also run zdq on durable (LMDB) queues, their batches alternated with a transient pool's")
    bench.add_argument(
        "--compare-auth", action="store_true",
        help=(
            "also run zdq without authentication: no-op throughput, its batches alternated with the futures "
            "path's on two pools placed side by side; with --suite latency, the round trip"
        ),
    )
    bench.add_argument(
        "--relay", action="store_true", help="also run zdq through a relay (relay=True): no-op throughput and round trip"
    )
    bench.add_argument("--suite", choices=("quick", "latency", "asyncio", "timing", "full", "scale", "monitor"), default="quick",
                       help="quick: no-op throughput (the futures path, and the daskqueue path: batch_submit, join, results), "
                       "and Executor.map beside client.map; latency: the single-task round trip alone, beside its "
                       "floor (bare ZeroMQ through a broker process); "
                       "asyncio: the event loop's lag while 1,000 tasks are awaited; "
                       "timing: delayed tasks' release lateness on an idle pool and the broker's memory "
                       "per delayed task (--delayed-tasks); "
                       "full: every case (latency, I/O, CPU, durable, auth, generator, asyncio, timing); "
                       "scale: placement, throughput, file descriptors and idle CPU on clusters of "
                       "2 to 32 workers (queues = workers / 2, consumers = 2 x workers); "
                       "monitor: the Dask scheduler's load from zdq's monitoring at 100 queues (--queues)")
    bench.add_argument("--scale-workers", metavar="LIST", default=None,
                       help="worker counts of the scale suite, default 2,8,16,32")
    bench.add_argument("--fan-out", type=int, default=None, help="the scale suite's zdq.fan-out (default: the setting)")
    bench.add_argument("--idle-seconds", type=float, default=5.0,
                       help="the scale suite measures each idle CPU figure over this long (default 5)")
    bench.add_argument("--generator-tasks", type=int, default=10_000_000, help="tasks of the generator case")
    bench.add_argument("--delayed-tasks", type=int, default=1_000_000,
                       help="delayed tasks of the timing suite's memory case (default 1000000)")
    bench.add_argument("--map-tasks", type=int, default=None,
                       help="items of the map case, Executor.map with a buffersize (default 5 x --tasks: 1000000)")
    bench.add_argument("--plots", metavar="DIR", default=None,
                       help="also sweep batch size and consumers (scale suite: its plot); write PNGs")
    bench.add_argument("--json", action="store_true", help="print the report as JSON")
    bench.set_defaults(func=_bench)
    inspect = sub.add_parser("inspect", help="ready, leased and dead tasks of durable queues, read-only, no cluster")
    inspect.add_argument("dirpath", help="a QueuePool's dirpath, or one queue directory in it")
    inspect.add_argument("--json", action="store_true", help="print the counts as JSON")
    inspect.set_defaults(func=_inspect)
    from zdq.observe.commands import add_parsers

    add_parsers(sub)
    for command in sub.choices.values():  # its usage errors show its usage, not zdq's
        command.set_defaults(command_parser=command)
    return parser


def _on_sigterm_as_ctrl_c() -> tuple[Callable[[], bool], Callable[[], None]]:
    """A SIGTERM (``kill``, a service manager, ``timeout``) stops the command as Ctrl-C does: its
    clusters, pools and the benchmark's floor processes are closed on the way out, not left behind
    (by default the process just died, and the processes it started ran on). Only where the
    command runs on the main thread and nobody set a handler of their own. Returns whether a
    SIGTERM came (the exit status is then 143), and what puts the default handler back."""
    came: list[int] = []
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return (lambda: False), (lambda: None)

    def stop(signum: int, frame: object) -> None:
        came.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one ends the process at once
        raise KeyboardInterrupt

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is stop:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, stop)
    return (lambda: bool(came)), restore


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    # Known arguments only: what the subcommand does not know is refused below by the
    # subcommand's own parser (argparse would refuse it with zdq's usage, and status 2).
    args, unknown = parser.parse_known_args(argv)
    command: argparse.ArgumentParser = getattr(args, "command_parser", parser)
    if unknown:
        given = list(sys.argv[1:] if argv is None else argv)
        # An option before the subcommand's name was given to zdq itself: zdq's usage says so.
        before = given[: given.index(args.command)] if args.command in given else []
        (parser if set(unknown) & set(before) else command).error(f"unrecognized arguments: {' '.join(unknown)}")
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose == 0:
        logging.getLogger("distributed").setLevel(logging.ERROR)
    terminated, restore = _on_sigterm_as_ctrl_c()
    try:
        return int(args.func(args))
    except ValueError as e:
        command.error(str(e))
    except KeyboardInterrupt:  # Ctrl-C (or SIGTERM), whatever the command was doing: no traceback
        return 128 + signal.SIGTERM if terminated() else 130
    except BrokenPipeError:
        # The reader of the output left (`zdq status | head -4`): end quietly, as a command killed
        # by SIGPIPE does (status 128 + 13); what is left in the buffer goes nowhere, so that
        # Python's own flush at exit does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    finally:
        restore()


if __name__ == "__main__":
    sys.exit(main())

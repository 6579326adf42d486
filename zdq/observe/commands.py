"""``zdq status``, ``zdq purge``, ``zdq dead-letters``, ``zdq schedules``, ``zdq rate-limit`` and
``zdq result``: the CLI's commands for live pools.

Each error a user can cause (a wrong address, a cluster without zdq, a pool or queue that does not
exist, a POOL that no pool can be named) ends the command with one line on stderr and exit status
1, within ``--timeout``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, Callable

from zdq.names import counted

__all__ = ["add_parsers"]

_DEFAULT_TIMEOUT = 5.0
#: The longest --timeout, --watch or --wait taken (a week): a longer one is a mistake (1e999 is
#: infinite, and near 1e308 the waits' own arithmetic overflows), refused before connecting.
_MAX_SECONDS = 7 * 24 * 3600.0


def _duration_error(option: str, seconds: float, *, zero: bool = False) -> str | None:
    """Why ``seconds`` given as ``option`` is refused (``None``: taken): finite, more than 0 (0
    too if ``zero``), at most :data:`_MAX_SECONDS`."""
    low = seconds >= 0 if zero else seconds > 0
    if low and seconds <= _MAX_SECONDS:
        return None
    what = "a finite number of seconds >= 0" if zero else "a positive number of seconds"
    return f"{option} must be {what}, at most {_MAX_SECONDS:.0f} (a week), got {seconds:g}"


def _live(fn: Callable[[Any, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run ``fn(client, args)`` with a client of ``--scheduler``; user errors become one line."""

    def run(args: argparse.Namespace) -> int:
        from zdq.errors import ZdqError
        from zdq.observe import remote

        # Checked before connecting: one line, status 1, and no wait that cannot end.
        durations = [("--timeout", args.timeout, False), ("--watch", getattr(args, "watch", None), False),
                     ("--wait", getattr(args, "wait", None), True)]
        for option, seconds, zero in durations:
            refused = None if seconds is None else _duration_error(option, seconds, zero=zero)
            if refused:
                return _fail(args, refused)
        if getattr(args, "pool", None) is not None:
            from zdq.names import check_pool_name

            try:
                check_pool_name(args.pool, "POOL")  # no pool has it: told before connecting
            except ValueError as e:
                return _fail(args, str(e))
        if args.command == "result":  # (rate-limit's --key is a function's, checked by its command)
            from zdq.client.by_id import task_key

            try:
                args.key = task_key(args.key)  # no task has it: told before connecting
            except (TypeError, ValueError) as e:
                return _fail(args, str(e))
        address = args.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS")
        if not address:  # as a wrong address is: status 1 (for `zdq result`, 2 means "not finished")
            return _fail(args, "no scheduler given: pass --scheduler ADDRESS or set DASK_SCHEDULER_ADDRESS")
        try:
            client = remote.connect(address, args.timeout)
        except OSError as e:
            return _fail(args, str(e).splitlines()[0])
        try:
            return fn(client, args)
        except KeyError as e:
            return _fail(args, str(e.args[0]) if e.args else str(e))
        except ValueError as e:  # a refusal (no confirmation): the cluster is untouched
            return _fail(args, str(e))
        except BrokenPipeError:  # the reader of the output left (`| head`): not the cluster's error
            raise
        except (ZdqError, OSError, TimeoutError) as e:
            return _fail(args, (str(e) or type(e).__name__).splitlines()[0])
        except KeyboardInterrupt:
            return 130
        finally:
            client.close(timeout=args.timeout)

    return run


def _fail(args: argparse.Namespace, message: str) -> int:
    print(f"zdq {args.command}: {message}", file=sys.stderr)
    return 1


def _status(client: Any, args: argparse.Namespace) -> int:
    from zdq.observe import remote

    while True:
        state = remote.status(client, args.timeout)
        if args.json:
            print(json.dumps(state, indent=None if args.watch else 2), flush=True)
        else:
            if args.watch and sys.stdout.isatty():
                print("\033[H\033[2J", end="")
            print(format_status(state), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def format_status(state: dict[str, Any]) -> str:
    from zdq.codec.rates import format_rate

    pools = state["pools"]
    if not pools:
        return "no live zdq pool on this cluster"
    lines = []
    for name, pool in pools.items():
        t, rates = pool["totals"], pool["rates"]
        rate = f"{rates['completed'][-1]:g}" if rates["completed"] else "-"
        unreported = pool.get("unreported", [])
        silent = f" ({len(unreported)} not reporting)" if unreported else ""
        lines.append(
            f"pool {name}: {counted(len(pool['queues']) + len(unreported), 'queue')}{silent}, "
            f"{counted(t['consumers'], 'consumer')}; "
            f"submitted {t['submitted']}, "
            f"completed {t['completed']}, failed {t['failed']}, retried {t['retried']}, "
            f"dead-lettered {t['dead_lettered']}, expired {t.get('expired', 0)}; {rate} tasks/s completed"
        )
        lines.append(
            f"  {'queue':<28} {'host':<16} {'durable':<7} {'ready':>9} {'delayed':>9} {'leased':>9} {'awaiting':>9} "
            f"{'dead':>7} {'consumers':>9} {'bad msgs':>8} {'refused':>7} {'unique':>7} {'limit':>9}"
        )
        for q in pool["queues"]:
            lines.append(
                f"  {q['name']:<28} {q.get('host', ''):<16} {'yes' if q['durable'] else 'no':<7} {q['ready_tasks']:>9} "
                f"{q.get('delayed_tasks', 0):>9} "
                f"{q['leased_tasks']:>9} {q['awaiting_tasks']:>9} {q['dead_tasks']:>7} {q['consumers']:>9} "
                f"{q['bad_messages']:>8} {q.get('refused_peers', 0):>7} {q.get('unique_keys', 0):>7} {format_rate(q.get('rate_limit')):>9}"
            )
        for q_name in unreported:
            lines.append(
                f"  {q_name:<28} no report lately: its worker is stopped or too busy, or the queue is being placed again"
            )
        if pool["consumers"]:
            lines.append(f"  {'consumer':<28} {'where':<28} {'state':<8} {'done':>9} {'failed':>7} {'in flight':>9}")
            for c in pool["consumers"]:
                state_ = "running" if c["running"] else "idle"
                lines.append(
                    f"  {c['name']:<28} {c['worker']:<28} {state_:<8} {c['tasks_done']:>9} {c['tasks_failed']:>7} "
                    f"{c['tasks_in_flight']:>9}"
                )
    return "\n".join(lines)


def _confirm(args: argparse.Namespace, question: str) -> bool:
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise ValueError(f"{question}: confirm with --yes (stdin is not a terminal)")
    try:
        return input(f"{question}? [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def _purge(client: Any, args: argparse.Namespace) -> int:
    from zdq.observe import remote

    queues = remote.queues_of(remote.status(client, args.timeout), args.pool, args.queue)
    ready = sum(q.get("ready_tasks", 0) for q in queues)
    delayed = sum(q.get("delayed_tasks", 0) for q in queues)
    names = ", ".join(q["name"] for q in queues)
    waiting = counted(ready, "ready task") + (f" and {counted(delayed, 'delayed task')}" if delayed else "")
    if not _confirm(args, f"cancel the {waiting} of {names} (they never run)"):
        print("nothing purged", file=sys.stderr)
        return 1
    done = remote.act(client, queues, "purge", args.timeout)
    for name, n in done.items():
        print(f"{name}: {counted(n, 'waiting task')} cancelled" if isinstance(n, int) else f"{name}: {n['error']}")
    return 0 if all(isinstance(n, int) for n in done.values()) else 1


def _dead_letters(client: Any, args: argparse.Namespace) -> int:
    from zdq.observe import remote

    queues = remote.queues_of(remote.status(client, args.timeout), args.pool, args.queue)
    if args.action == "list":
        letters = remote.act(client, queues, "dead-letters", args.timeout)
        if args.json:
            print(json.dumps(_ids_as_strings(letters), indent=2))
            return 0 if all(isinstance(f, list) for f in letters.values()) else 1
        for name, found in letters.items():
            if isinstance(found, dict):
                print(f"{name}: {found['error']}")
                continue
            for d in found:
                reason = d["reason"].strip().splitlines()
                print(f"{name} chunk {d['chunk_id']} ({counted(d['n_tasks'], 'task')}): {reason[-1] if reason else ''}")
        if not any(isinstance(f, list) and f for f in letters.values()):
            print("no dead letters" + (" in the queues that answered" if any(isinstance(f, dict) for f in letters.values()) else ""))
        return 0 if all(isinstance(f, list) for f in letters.values()) else 1
    chunks = args.chunk or None
    what = f"chunks {', '.join(map(str, chunks))}" if chunks else "every dead letter"
    where = ", ".join(q["name"] for q in queues)
    where = f"whichever of {where} holds them" if chunks and len(queues) > 1 else where
    if args.action == "purge" and not _confirm(args, f"delete {what} of {where}"):
        print("nothing purged", file=sys.stderr)
        return 1
    done = remote.act(client, queues, f"{args.action}-dead", args.timeout, chunks)
    verb = "requeued" if args.action == "requeue" else "purged"
    for name, n in done.items():
        print(f"{name}: {counted(n, 'dead chunk')} {verb}" if isinstance(n, int) else f"{name}: {n['error']}")
    total = sum(n for n in done.values() if isinstance(n, int))
    if chunks and total < len(set(chunks)):
        # Some chunks named were no dead letter of these queues: say so, and fail the command.
        missing = len(set(chunks)) - total
        what = "is not a dead letter" if missing == 1 else "are not dead letters"
        return _fail(args, f"{missing} of the chunks given {what} of {', '.join(done)}")
    return 0 if all(isinstance(n, int) for n in done.values()) else 1


#: The fields of the commands' JSON that hold ids (up to 2**63): written as strings, since JSON
#: readers (jq, JavaScript) hold numbers as doubles, exact only to 2**53: an id read back would
#: name another chunk, schedule or task (reviewer 27b). The commands take them back as digits.
_ID_FIELDS = frozenset({"chunk_id", "schedule_id", "key"})


def _ids_as_strings(answers: dict[str, Any]) -> dict[str, Any]:
    """Each queue's answer (a list of records, or ``{"error": why}``) with its ids as strings."""
    return {
        queue: [{k: str(v) if k in _ID_FIELDS and isinstance(v, int) else v for k, v in r.items()} for r in found]
        if isinstance(found, list)
        else found
        for queue, found in answers.items()
    }


def _schedules(client: Any, args: argparse.Namespace) -> int:
    from zdq.observe import remote

    queues = remote.queues_of(remote.status(client, args.timeout), args.pool)
    if args.action == "list":
        found = remote.act(client, queues, "schedules", args.timeout)
        if args.schedule is not None:  # only that one
            which = _schedule_key(args.schedule)
            key = "schedule_name" if isinstance(which, str) else "schedule_id"
            found = {q: [s for s in f if s[key] == which] if isinstance(f, list) else f for q, f in found.items()}
        if args.json:
            print(json.dumps(_ids_as_strings(found), indent=2))
        else:
            print(format_schedules(found))
        return 0 if all(isinstance(f, list) for f in found.values()) else 1
    if args.schedule is None:
        return _fail(args, "cancel needs the schedule's name or id (as `zdq schedules list` shows it)")
    which = _schedule_key(args.schedule)
    if not _confirm(args, f"cancel schedule {which!r} of pool {args.pool} (no tick after this)"):
        print("nothing cancelled", file=sys.stderr)
        return 1
    done = remote.act(client, queues, "cancel-schedule", args.timeout, which)
    failed = [f"{name}: {n['error']}" for name, n in done.items() if isinstance(n, dict)]
    for line in failed:
        print(line)
    if any(n is True for n in done.values()):
        print(f"schedule {which!r} cancelled")
        return 1 if failed else 0
    return _fail(args, f"pool {args.pool} has no schedule {which!r}" + (" among the queues that answered" if failed else ""))


def _schedule_key(text: str) -> int | str:
    """An id if ``text`` is digits (a schedule's name never is), else a name, checked."""
    from zdq.codec.schedules import check_schedule_name

    return int(text) if text.isascii() and text.isdigit() else check_schedule_name(text)


def format_schedules(found: dict[str, Any]) -> str:
    """The schedules of a pool's queues (``remote.act(..., "schedules")``), by next tick."""
    from datetime import datetime, timezone

    def when(t: float | None) -> str:
        return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if t else "-"

    lines = [f"{name}: {f['error']}" for name, f in found.items() if isinstance(f, dict)]
    rows = sorted(((q, s) for q, f in found.items() if isinstance(f, list) for s in f), key=lambda qs: qs[1]["next_tick"])
    if not rows:
        return "\n".join([*lines, "no schedules"])
    lines.append(
        f"{'name':<24} {'id':>19} {'task':<20} {'timing':<16} {'next tick (UTC)':<19} {'ticks':>7} {'skipped':>7}  queue"
    )
    for queue, s in rows:
        timing = f"cron {s['cron']}" if s["cron"] else f"every {s['every']:g}s"
        lines.append(
            f"{s['schedule_name'] or '-':<24} {s['schedule_id']:>19} {s['task']:<20} {timing:<16} {when(s['next_tick']):<19} "
            f"{s['ticks']:>7} {s['skipped']:>7}  {queue}"
        )
    return "\n".join(lines)


def _rate_args(args: argparse.Namespace) -> tuple[str | None, float | None, bytes]:
    """``zdq rate-limit``'s QUEUE (or None), RATE (None: none) and key, checked before any
    connection: a rate out of bounds, or a key that is no function's ``module:qualname`` or is
    over 1024 bytes, is refused as by the API."""
    from zdq.codec.rates import rate_key_of, rate_of

    if len(args.where) > 2:
        raise ValueError(f"give POOL, an optional QUEUE and RATE, got {' '.join([args.pool, *args.where])!r}")
    queue, given = (None, args.where[0]) if len(args.where) == 1 else args.where
    rate = None if given.strip().lower() in ("none", "off", "0") else rate_of(given, "RATE")
    return queue, rate, b"" if args.key is None else rate_key_of(args.key, "--key")


def _rate_limit_command(args: argparse.Namespace) -> int:
    try:
        _rate_args(args)  # a bad RATE or --key is told before connecting
    except ValueError as e:
        return _fail(args, str(e))
    return _live(_rate_limit)(args)


def _rate_limit(client: Any, args: argparse.Namespace) -> int:
    """``zdq rate-limit POOL [QUEUE] RATE``: the pool's limit (split among its queues) or one
    queue's; ``none`` removes it. ``--key`` limits one function's tasks instead."""
    from zdq.codec.rates import format_rate
    from zdq.observe import remote

    queue, rate, key = _rate_args(args)
    queues = remote.queues_of(remote.status(client, args.timeout), args.pool, queue)
    each = rate if rate is None or queue is not None else rate / len(queues)
    done = remote.act(client, queues, "rate-limit", args.timeout, each, key)
    what = f"key {args.key} " if args.key else ""
    for name, answer in done.items():
        print(f"{name}: {what}rate limit {format_rate(each)}" if answer is None else f"{name}: {answer['error']}")
    return 0 if all(answer is None for answer in done.values()) else 1


def _result(client: Any, args: argparse.Namespace) -> int:
    """``zdq result POOL KEY``: a task's state, and its value or error (:mod:`zdq.client.by_id`)."""
    from zdq.client.by_id import outcome, task_key

    key = task_key(args.key)  # checked before connecting (see _live)
    state, value, error, why = outcome(args.pool, key, args.wait, client=client)
    if error is not None:
        notes = [n for n in getattr(error, "__notes__", ()) if isinstance(n, str) and n.startswith("zdq:")]
        shown = " ".join(" ".join([f"{type(error).__name__}: {error}", *notes]).split())  # one line, zdq's notes too
    else:
        shown = repr(value) if state == "done" else ""
    if args.json:
        print(json.dumps({"pool": args.pool, "key": str(key), "state": state, "result": shown, "detail": why}))
    else:
        print(f"task {args.key} of pool {args.pool}: {why}" + (f": {shown}" if shown else ""))
    return _RESULT_STATUS.get(state, 2)


#: ``zdq result``'s exit status by the task's state (2: not finished, or not known).
_RESULT_STATUS = {"done": 0, "failed": 1, "cancelled": 1, "expired": 1}


def _live_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheduler", metavar="ADDRESS", default=None,
                        help="the Dask scheduler (default: $DASK_SCHEDULER_ADDRESS); security as for a Dask client")
    parser.add_argument("--timeout", type=float, default=_DEFAULT_TIMEOUT,
                        help=f"seconds to wait for the cluster, default {_DEFAULT_TIMEOUT:g}")


def add_parsers(sub: Any) -> None:
    """Add ``status``, ``purge``, ``dead-letters``, ``schedules``, ``rate-limit`` and ``result`` to the ``zdq`` command's subparsers."""
    status = sub.add_parser("status", help="every live pool of a cluster: queues, consumers, rates")
    _live_options(status)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.add_argument("--watch", metavar="SECONDS", type=float, nargs="?", const=1.0, default=None,
                        help="print it again every SECONDS (default 1) until interrupted")
    status.set_defaults(func=_live(_status))

    purge = sub.add_parser("purge", help="cancel the ready and delayed tasks of a live pool (or one queue): they never run")
    _live_options(purge)
    purge.add_argument("pool", help="the pool's name (as `zdq status` shows it)")
    purge.add_argument("queue", nargs="?", default=None, help="one queue: its name or index (default: all)")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(func=_live(_purge))

    dead = sub.add_parser("dead-letters", help="list, requeue or purge the dead letters of a live pool")
    dead.add_argument("action", choices=("list", "requeue", "purge"))
    _live_options(dead)
    dead.add_argument("pool", help="the pool's name (as `zdq status` shows it)")
    dead.add_argument("queue", nargs="?", default=None, help="one queue: its name or index (default: all)")
    dead.add_argument("--chunk", type=int, action="append", default=None, metavar="ID",
                      help="only this dead chunk (as `list` shows it); repeat for several")
    dead.add_argument("--json", action="store_true", help="list: print JSON")
    dead.add_argument("--yes", action="store_true", help="purge: do not ask for confirmation")
    dead.set_defaults(func=_live(_dead_letters))

    schedules = sub.add_parser("schedules", help="list the schedules of a live pool, or cancel one by name or id")
    schedules.add_argument("action", choices=("list", "cancel"))
    _live_options(schedules)
    schedules.add_argument("pool", help="the pool's name (as `zdq status` shows it)")
    schedules.add_argument("schedule", nargs="?", default=None, metavar="NAME|ID",
                           help="the schedule's name, or its id (digits): the one to cancel, or to list alone")
    schedules.add_argument("--json", action="store_true", help="list: print JSON")
    schedules.add_argument("--yes", action="store_true", help="cancel: do not ask for confirmation")
    schedules.set_defaults(func=_live(_schedules))
    limit = sub.add_parser(
        "rate-limit", help="change the rate limit of a live pool (split among its queues) or of one queue"
    )
    _live_options(limit)
    limit.add_argument("pool", help="the pool's name (as `zdq status` shows it)")
    limit.add_argument(
        "where", nargs="+", metavar="[QUEUE] RATE",
        help="one queue (name or index; default: the pool, split evenly among its queues), then the rate: "
        "100/s, 6000/m, 10/h, tasks per second, or none",
    )
    limit.add_argument("--key", default=None, metavar="module:qualname",
                       help="limit only this function's tasks (those submitted with rate_limit=)")
    # A RATE such as -5/s is an argument (refused as a rate), not an unknown option: argparse
    # takes words that start with '-' and a digit for arguments when this matches them.
    limit._negative_number_matcher = re.compile(r"^-\.?\d")
    limit.set_defaults(func=_rate_limit_command)
    result = sub.add_parser(
        "result", help="a task's state and result by its key (future.key), from any process",
        description="Exit status: 0 done; 1 failed, cancelled or expired; 2 pending, started or unknown "
        "(and 1 when the command itself fails, a usage error included).",
        usage_status=1,  # 2 is "not finished": a mistake in the command line must not read as that
    )
    _live_options(result)
    result.add_argument("pool", help="the pool's name (as `zdq status` shows it)")
    result.add_argument("key", help="the task's key (future.key): its digits")
    result.add_argument("--wait", metavar="SECONDS", type=float, default=0.0,
                        help="wait up to SECONDS (>= 0, at most a week) for it to finish (default: say where it is now)")
    result.add_argument("--json", action="store_true", help="print JSON")
    result.set_defaults(func=_live(_result))

"""What the CLI's commands print, from the figures they are given: no cluster, no socket."""

from __future__ import annotations

from typing import Any

from zdq.observe.commands import format_status


def _pool(queues: int, consumers: int) -> dict[str, Any]:
    totals = dict.fromkeys(("submitted", "completed", "failed", "retried", "dead_lettered", "expired"), 0)
    queue = {
        "name": "jobs-queue-0", "host": "h", "durable": False, "ready_tasks": 0, "leased_tasks": 0, "awaiting_tasks": 0,
        "dead_tasks": 0, "consumers": consumers, "bad_messages": 0,
    }
    return {"totals": {**totals, "consumers": consumers}, "rates": {"completed": []}, "queues": [queue] * queues,
            "consumers": []}


def test_status_counts_queues_and_consumers_in_singular_or_plural() -> None:
    assert format_status({"pools": {"jobs": _pool(1, 1)}}).startswith("pool jobs: 1 queue, 1 consumer; submitted 0")
    assert format_status({"pools": {"jobs": _pool(2, 0)}}).startswith("pool jobs: 2 queues, 0 consumers; submitted 0")


def test_an_unknown_option_is_told_by_the_parser_it_was_given_to(capsys: Any) -> None:
    """Before the subcommand's name, an option was given to zdq itself; after it, to the
    subcommand: each parser's usage says which (argparse's status 2, no connection tried)."""
    import pytest

    from zdq.cli import main

    for argv, said in ((["--bogus", "status"], "zdq: error: unrecognized arguments: --bogus"),
                       (["status", "--bogus"], "zdq status: error: unrecognized arguments: --bogus")):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        assert said in capsys.readouterr().err


def test_a_queue_without_a_recent_report_is_shown_counted_and_answered_for_not_skipped() -> None:
    """A queue whose worker is stopped stops reporting, and the monitor forgets it: `zdq status`
    showed the pool with one queue fewer, and `zdq purge --yes` cancelled the others' tasks, said
    nothing of it and exited 0 (its tasks then ran)."""
    from zdq.observe import remote

    pool = _pool(1, 1)
    pool["unreported"] = ["jobs-queue-1"]
    state = {"pools": {"jobs": pool}}
    shown = format_status(state)
    assert shown.startswith("pool jobs: 2 queues (1 not reporting), 1 consumer"), shown
    assert "jobs-queue-1" in shown and "no report lately" in shown
    queues = remote.queues_of(state, "jobs")
    assert [q["name"] for q in queues] == ["jobs-queue-0", "jobs-queue-1"]
    assert remote.queues_of(state, "jobs", "1") == [{"name": "jobs-queue-1", "unreported": True}]
    answers = remote.act(None, remote.queues_of(state, "jobs", "1"), "purge", 5.0)  # nothing to ask: no client used
    assert answers == {"jobs-queue-1": {"error": remote.UNREPORTED}}
    assert answers["jobs-queue-1"]["error"].startswith("not reached") and "nothing was done there" in remote.UNREPORTED

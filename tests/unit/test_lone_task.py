"""A chunk of one task on the consumer's lone path (``Runner._run_lone``, issue 26 point 4): it
keeps what the general path guarantees (the DONE carries its result or error, a cancellation
finds it started once it runs, one held before it starts takes effect, retries, no DONE once its
broker was placed again, a forged chunk is refused before anything is unpickled)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from zdq.codec.results import loads_results
from zdq.codec.tasks import ITEMS, PICKLED, TaskOptions, dumps_chunk, dumps_task
from zdq.consumer.base import ConsumerBaseClass
from zdq.consumer.run import Lone as _Lone
from zdq.consumer.runner import Counters, Runner
from zdq.transport import protocol as p

KEY = b"k" * 32


class Recorder(ConsumerBaseClass):
    """Records the items it is given; ``during`` runs inside the task."""

    def __init__(self, during: Any = None) -> None:
        super().__init__(name="recorder")
        self.seen: list[object] = []
        self.during = during

    def process_item(self, item: object) -> object:
        self.seen.append(item)
        if self.during is not None:
            self.during(item)
        return item


def _runner(handler: ConsumerBaseClass, sent: list[tuple[int, p.Message]], **options: Any) -> tuple[Runner, Counters]:
    fetching = threading.Event()
    fetching.set()
    counters = Counters()
    runner = Runner(
        "c", handler, lambda broker, msg: sent.append((broker, msg)), threading.Event(), fetching, counters,
        max_concurrency=1, defaults=TaskOptions(**options), crash_attempts=3, payload_key=KEY, queues=["q0", "q1"],
    )
    return runner, counters


def _item(chunk_id: int, item: object, base: int = 40) -> p.Deliver:
    return p.Deliver(chunk_id, 1, 1, dumps_chunk(base, [item], KEY, ITEMS))


def _results(sent: list[tuple[int, p.Message]]) -> list[tuple[int, int, int, list[Any], dict[int, Any]]]:
    out = []
    for broker, msg in sent:
        if type(msg) is p.Retried:  # a retry's word to the broker (see the retries' test)
            continue
        assert type(msg) is p.Done
        base, values, errors = loads_results(msg.results, KEY)
        out.append((broker, msg.chunk_id, base, values, errors))
    return out


def _double(x: int) -> int:
    return 2 * x


def test_a_lone_task_of_submit_reports_its_result_and_leaves_nothing_behind() -> None:
    sent: list[tuple[int, p.Message]] = []
    runner, counters = _runner(Recorder(), sent)
    runner.received(3, 1)
    runner.execute(1, p.Deliver(3, 1, 1, dumps_chunk(7, [dumps_task((_double, (21,)))], KEY, PICKLED)))
    assert _results(sent) == [(1, 3, 7, [42], {})]
    assert counters.tasks_done == 1 and runner._chunks == {}


def test_a_cancellation_while_a_lone_task_runs_finds_it_started_and_its_done_carries_its_value() -> None:
    sent: list[tuple[int, p.Message]] = []
    answers: list[list[int]] = []
    runner: Runner

    def cancel_me(item: object) -> None:
        assert type(runner._chunks[5]) is _Lone  # run on the lone path
        answers.append(runner.cancel(5, (0,)))

    runner, _ = _runner(Recorder(cancel_me), sent)
    runner.received(5, 0)
    runner.execute(0, _item(5, "x"))
    assert answers == [[]]
    assert _results(sent) == [(0, 5, 40, ["x"], {})]


def test_a_cancellation_held_before_a_lone_chunk_starts_takes_effect_and_the_task_never_runs() -> None:
    sent: list[tuple[int, p.Message]] = []
    handler = Recorder()
    runner, counters = _runner(handler, sent)
    runner.received(6, 0)
    assert runner.cancel(6, (0,)) == [0]
    runner.execute(0, _item(6, "never"))
    [(_, _, _, values, errors)] = _results(sent)
    assert handler.seen == [] and values == [None] and errors[0].type_name == "zdq.errors.TaskCancelled"
    assert counters.tasks_cancelled == 1 and counters.tasks_done == 0


def test_a_lone_task_running_when_its_broker_is_placed_again_reports_nothing() -> None:
    sent: list[tuple[int, p.Message]] = []
    runner: Runner
    runner, _ = _runner(Recorder(lambda item: runner.broker_replaced(0)), sent)
    runner.received(8, 0)
    runner.execute(0, _item(8, "x"))
    assert sent == [] and runner._chunks == {}


@pytest.mark.parametrize("retries", [0, 2])
def test_a_lone_task_that_fails_takes_the_careful_path_retried_by_the_consumers_options(retries: int) -> None:
    sent: list[tuple[int, p.Message]] = []
    failures: list[object] = []

    def fail_twice(item: object) -> None:
        if len(failures) < 2:
            failures.append(item)
            raise OSError(f"attempt {len(failures)}")

    runner, counters = _runner(Recorder(fail_twice), sent, retries=retries, retry_backoff=0.0)
    runner.received(9, 1)
    runner.execute(1, _item(9, "y"))
    [(broker, chunk_id, base, values, errors)] = _results(sent)
    assert (broker, chunk_id, base) == (1, 9, 40)
    if retries:
        assert values == ["y"] and errors == {} and counters.tasks_retried == 2 and counters.tasks_done == 1
        # Before each retry the broker is told how many attempts failed, for the consumer after.
        assert [m for _, m in sent if type(m) is p.Retried] == [p.Retried(9, ((40, 1),)), p.Retried(9, ((40, 2),))]
    else:
        assert values == [None] and errors[0].message == "attempt 1" and counters.tasks_failed == 1
    assert runner._chunks == {}


def test_a_forged_lone_chunk_is_refused_before_it_is_unpickled() -> None:
    sent: list[tuple[int, p.Message]] = []
    handler = Recorder()
    runner, counters = _runner(handler, sent)
    forged = bytearray(dumps_chunk(40, ["x"], KEY, ITEMS))
    forged[-1] ^= 1
    runner.received(4, 0)
    runner.execute(0, p.Deliver(4, 1, 1, bytes(forged)))
    [(_, _, _, _, errors)] = _results(sent)
    assert handler.seen == [] and errors[0].type_name == "zdq.errors.SerializationError"
    assert counters.bad_chunks == 1


_flaky_calls: list[int] = []


def _flaky(x: int) -> int:
    _flaky_calls.append(x)
    if len(_flaky_calls) == 1:
        raise OSError("first attempt")
    return x + 1


def test_a_lone_task_with_options_of_its_own_is_retried_by_them() -> None:
    sent: list[tuple[int, p.Message]] = []
    runner, counters = _runner(Recorder(), sent)
    _flaky_calls.clear()
    task = (_flaky, (1,), None, TaskOptions(retries=1, retry_backoff=0.0))
    runner.received(2, 0)
    runner.execute(0, p.Deliver(2, 1, 1, dumps_chunk(0, [dumps_task(task)], KEY, PICKLED)))
    assert _results(sent) == [(0, 2, 0, [2], {})]
    assert _flaky_calls == [1, 1] and counters.tasks_retried == 1


def test_a_redelivered_task_whose_earlier_attempts_failed_counts_them_and_is_not_run_past_its_retries() -> None:
    """Its broker tells (RETRIED, before the DELIVER) what the consumer that died had retried."""
    sent: list[tuple[int, p.Message]] = []
    handler = Recorder()
    runner, counters = _runner(handler, sent, retries=2, retry_backoff=0.0)
    runner.retried(9, ((40, 2),))  # failed twice, then its consumer died in the third attempt
    runner.received(9, 1)
    runner.execute(1, p.Deliver(9, 1, 2, dumps_chunk(40, ["y"], KEY, ITEMS)))
    assert handler.seen == []  # three attempts used: dead-lettered without a fourth
    [dead] = [m for _, m in sent if type(m) is p.Dead]
    assert b"(3 attempts)" in dead.reason
    [(_, chunk_id, _, values, errors)] = _results([(b, m) for b, m in sent if type(m) is not p.Dead])
    assert chunk_id == 9 and "used its 3 attempts" in errors[0].message
    # With one failure told, it runs once more.
    runner.retried(10, ((50, 1),))
    runner.received(10, 1)
    runner.execute(1, p.Deliver(10, 1, 2, dumps_chunk(50, ["z"], KEY, ITEMS)))
    assert handler.seen == ["z"]


def test_a_task_of_a_chunk_whose_broker_was_placed_again_is_not_retried_here() -> None:
    """The new broker runs the chunk again from its storage: the old run went on retrying its
    failing task (eight runs of retries=3 across a durable broker's kill, reviewer 31)."""
    sent: list[tuple[int, p.Message]] = []
    runner: Runner | None = None
    calls: list[object] = []

    def fails_and_moves(item: object) -> None:
        calls.append(item)
        assert runner is not None
        runner.broker_replaced(1)  # told while the first attempt runs
        raise OSError("declined")

    runner, counters = _runner(Recorder(fails_and_moves), sent, retries=3, retry_backoff=0.0)
    runner.received(9, 1)
    runner.execute(1, _item(9, "y"))
    assert calls == ["y"] and counters.tasks_retried == 0
    assert not [m for _, m in sent if type(m) in (p.Done, p.Retried)]  # nothing goes to the old broker's queue

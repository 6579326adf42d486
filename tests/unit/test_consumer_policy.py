"""The consumer's task policy (retry, fail or dead-letter), driven directly: no cluster, no sockets.

Also the two pure pieces around it: the error a failed task sends back, and the abstract base class
users subclass.
"""

from __future__ import annotations

import pickle
import threading
from typing import Any

import cloudpickle
import pytest

from zdq.consumer import ConsumerBaseClass, GeneralConsumer
from zdq.consumer.policy import (
    DeadLetter,
    Fail,
    Retry,
    after_failure,
    attempts_allowed,
    backoff,
    on_redelivery,
)
from zdq.codec.results import error_info
from zdq.errors import RemoteTaskError
from zdq.serialization import (
    ErrorInfo,
    dumps_results,
    error_to_exception,
    loads_results,
)
from zdq.tasks import TaskOptions

CRASH_ATTEMPTS = 2  # the default of zdq.crash-attempts


def low() -> float:
    return 0.0  # the smallest jitter: x0.5


def high() -> float:
    return 0.999999  # the largest jitter: just under x1.5


# -- backoff ---------------------------------------------------------------------------------------


def test_the_backoff_doubles_at_each_attempt_and_jitter_spreads_it_from_half_to_one_and_a_half() -> None:
    options = TaskOptions(retries=10, retry_backoff=0.1, retry_backoff_max=1000.0)
    assert [backoff(options, a, low) for a in (1, 2, 3, 4)] == pytest.approx([0.05, 0.1, 0.2, 0.4])
    assert [backoff(options, a, high) for a in (1, 2, 3, 4)] == pytest.approx([0.15, 0.3, 0.6, 1.2], rel=1e-5)
    assert backoff(options, 3, lambda: 0.5) == pytest.approx(0.4)  # no jitter: 0.1 * 2**2


def test_the_backoff_never_exceeds_retry_backoff_max_even_with_jitter() -> None:
    options = TaskOptions(retries=100, retry_backoff=1.0, retry_backoff_max=3.0)
    assert backoff(options, 2, low) == pytest.approx(1.0)  # 2 * 0.5: under the cap
    assert backoff(options, 2, high) == pytest.approx(3.0, rel=1e-5)  # 2 * 1.5 = 3: at the cap
    assert backoff(options, 3, low) == 2.0
    assert backoff(options, 3, high) == 3.0  # 4 * 1.5 = 6: capped
    assert backoff(options, 10_000, high) == 3.0  # no overflow however many attempts


def test_a_zero_backoff_retries_at_once() -> None:
    assert backoff(TaskOptions(retries=3, retry_backoff=0.0), 3, high) == 0.0


def test_the_real_jitter_stays_within_its_bounds() -> None:
    options = TaskOptions(retries=5, retry_backoff=0.2, retry_backoff_max=30.0)
    delays = {backoff(options, 2) for _ in range(200)}
    assert all(0.2 <= d < 0.6 for d in delays)  # 0.4 x [0.5, 1.5)
    assert len(delays) > 100  # jittered, not constant


# -- after a failure -------------------------------------------------------------------------------


def test_a_task_without_retries_fails_at_its_first_error() -> None:
    assert after_failure(TaskOptions(), 0, CRASH_ATTEMPTS, 1, ValueError("x")) == Fail()


def test_a_task_with_retries_is_retried_until_its_last_attempt_then_dead_lettered() -> None:
    options = TaskOptions(retries=2, retry_backoff=0.1)
    first = after_failure(options, 0, CRASH_ATTEMPTS, 1, OSError(), jitter=low)
    second = after_failure(options, 0, CRASH_ATTEMPTS, 2, OSError(), jitter=low)
    assert first == Retry(pytest.approx(0.05)) and second == Retry(pytest.approx(0.1))
    assert after_failure(options, 0, CRASH_ATTEMPTS, 3, OSError()) == DeadLetter(3)


def test_retry_on_filters_which_errors_are_retried() -> None:
    options = TaskOptions(retries=3, retry_on=(OSError,))
    assert isinstance(after_failure(options, 0, CRASH_ATTEMPTS, 1, ConnectionError()), Retry)  # an OSError
    # Not retried, and dead-lettered at once because the task had retries (so it can be requeued).
    assert after_failure(options, 0, CRASH_ATTEMPTS, 1, KeyError("k")) == DeadLetter(1)
    everything = TaskOptions(retries=1, retry_on=(BaseException,))
    assert isinstance(after_failure(everything, 0, CRASH_ATTEMPTS, 1, KeyboardInterrupt()), Retry)
    assert after_failure(TaskOptions(retries=1), 0, CRASH_ATTEMPTS, 1, KeyboardInterrupt()) == DeadLetter(1)


def test_a_stopping_consumer_retries_nothing() -> None:
    options = TaskOptions(retries=5)
    assert after_failure(options, 0, CRASH_ATTEMPTS, 1, OSError(), stopping=True) == DeadLetter(1)
    assert after_failure(TaskOptions(), 0, CRASH_ATTEMPTS, 1, OSError(), stopping=True) == Fail()


# -- crashes: tasks whose chunk killed its consumer ------------------------------------------------


def test_crashes_raise_the_attempts_allowed_to_crash_attempts() -> None:
    assert attempts_allowed(TaskOptions(retries=0), 0, CRASH_ATTEMPTS) == 1
    assert attempts_allowed(TaskOptions(retries=0), 1, CRASH_ATTEMPTS) == 2  # one crash is not poison yet
    assert attempts_allowed(TaskOptions(retries=4), 1, CRASH_ATTEMPTS) == 5  # retries count if they are more
    assert attempts_allowed(TaskOptions(retries=0), 1, 7) == 7


def test_a_task_that_killed_its_consumer_too_often_is_dead_lettered_without_running() -> None:
    assert on_redelivery(TaskOptions(), 0, CRASH_ATTEMPTS) is None  # a first delivery runs
    assert on_redelivery(TaskOptions(), 1, CRASH_ATTEMPTS) is None  # one crash: run it again, alone
    verdict = on_redelivery(TaskOptions(), 2, CRASH_ATTEMPTS)
    assert verdict == DeadLetter(2, killed=True)
    assert on_redelivery(TaskOptions(retries=2), 2, CRASH_ATTEMPTS) is None  # 3 attempts allowed
    assert on_redelivery(TaskOptions(retries=2), 3, CRASH_ATTEMPTS) == DeadLetter(3, killed=True)
    assert verdict is not None and verdict.message(41) == "task 41 killed its consumer 2 times; it was dead-lettered"


def test_the_attempts_of_a_redelivered_task_count_on_from_its_crashes() -> None:
    # Crashed once; this run is attempt 2 of the 2 allowed: its failure is final, and since the
    # task killed a consumer before it is dead-lettered, not merely failed.
    assert after_failure(TaskOptions(), 1, CRASH_ATTEMPTS, 2, ValueError()) == DeadLetter(2)
    options = TaskOptions(retries=3)
    assert isinstance(after_failure(options, 1, CRASH_ATTEMPTS, 2, ValueError(), jitter=low), Retry)
    assert after_failure(options, 1, CRASH_ATTEMPTS, 4, ValueError()) == DeadLetter(4)


def test_a_dead_letter_says_which_task_how_many_attempts_and_why() -> None:
    info = ErrorInfo(None, "builtins.ValueError", "bad input", "Traceback (most recent call last):\n  ...\n")
    verdict = DeadLetter(3)
    assert verdict.reason(7, info) == (
        "task 7 (3 attempts): builtins.ValueError: bad input\nTraceback (most recent call last):\n  ...\n"
    )
    assert verdict.note(7) == "zdq: task 7 failed 3 attempts and was dead-lettered"


def test_decisions_are_immutable_values() -> None:
    with pytest.raises(AttributeError):
        Retry(1.0).delay = 2.0  # type: ignore[misc]
    assert Retry(1.0) == Retry(1.0) and DeadLetter(2) != DeadLetter(2, killed=True)


# -- the error a failed task sends back ------------------------------------------------------------


class TwoArgError(Exception):
    """Pickles as ``TwoArgError(message)``, which its ``__init__`` refuses: it does not unpickle."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as e:  # noqa: BLE001 - returned for inspection
        return e


def test_an_exception_whose_init_refuses_its_args_travels_as_itself_made_again_without_its_init() -> None:
    # Pickled as every exception is, it would load as TwoArgError("7: bad"), which its __init__
    # refuses: the driver would fail the whole chunk's results. It travels as its class, args and
    # attributes instead, and `except TwoArgError` on the driver still catches it (reviewer 27a).
    exc = _raised(TwoArgError(7, "bad"))
    exc.code = 7  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(exc))
    info = error_info(exc)
    assert info.without_init and info.exception is exc
    assert info.type_name.endswith("TwoArgError") and info.message == "7: bad" and "_raised" in info.traceback
    _, values, errors = loads_results(dumps_results(10, [None, 1], {0: info}))
    assert values == [None, 1]
    raised = error_to_exception(errors[0])
    assert type(raised) is TwoArgError and raised.args == ("7: bad",) and raised.code == 7  # type: ignore[attr-defined]
    assert any("_raised" in note for note in raised.__notes__)
    # Sent on again (a dead letter's, a result kept by id), it still loads.
    again = pickle.loads(cloudpickle.dumps(errors[0]))
    assert type(again.exception) is TwoArgError and again.without_init


class _OwnReduce(Exception):
    """Pickles in a way of its own, which fails: zdq does not go around it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse, ())


def _refuse() -> None:
    raise RuntimeError("I do not load")


class _HoldsALock(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(a)
        self.lock = threading.Lock()


@pytest.mark.parametrize("exc", [_OwnReduce("own way"), _HoldsALock(1, 2)], ids=["own-reduce", "unpicklable-attribute"])
def test_an_exception_that_travels_neither_way_is_a_remote_task_error_that_says_why(exc: BaseException) -> None:
    info = error_info(_raised(exc))
    assert info.exception is None and not info.without_init
    _, _, errors = loads_results(dumps_results(10, [None], {0: info}))
    remote = error_to_exception(errors[0])
    assert isinstance(remote, RemoteTaskError) and remote.type_name == info.type_name
    assert any("could not travel back as itself" in note for note in remote.__notes__), remote.__notes__


def test_an_exception_that_round_trips_travels_as_itself() -> None:
    info = error_info(_raised(ValueError("plain")))
    assert isinstance(info.exception, ValueError) and info.exception.__traceback__ is None
    assert info.type_name == "builtins.ValueError" and "plain" in info.traceback


# -- the classes users subclass --------------------------------------------------------------------


def test_a_consumer_class_without_process_item_cannot_be_instantiated() -> None:
    class NoItems(ConsumerBaseClass):
        pass

    with pytest.raises(TypeError, match="process_item"):
        NoItems(name="x")  # type: ignore[abstract]
    with pytest.raises(TypeError):
        ConsumerBaseClass(name="x")  # type: ignore[abstract]
    assert GeneralConsumer(name="g").process_item((divmod, 7, 2)) == (3, 1)
    with pytest.raises(TypeError, match="GeneralConsumer runs functions"):
        GeneralConsumer(name="g").process_item("not a call")


def test_attempts_that_failed_before_a_crash_count_against_the_task() -> None:
    """failed, failed, killed its consumer: with retries=2 that is its three attempts."""
    verdict = on_redelivery(TaskOptions(retries=2), 1, CRASH_ATTEMPTS, failed=2)
    assert verdict == DeadLetter(3, killed=True, crashes=1)
    assert verdict.message(7) == (
        "task 7 used its 3 attempts (1 killed its consumer, the others failed); it was dead-lettered"
    )
    assert on_redelivery(TaskOptions(retries=2), 1, CRASH_ATTEMPTS, failed=1) is None  # one left


def _raise_two_arg_error() -> None:
    raise TwoArgError(7, "bad")


def test_a_hard_tasks_child_sends_such_an_exception_as_its_parts_for_the_worker_to_make_again() -> None:
    # zdq.consumer.child imports nothing of zdq: it sends the class, args and attributes, and the
    # worker makes the exception with zdq.errors.made_without_init (as zdq.consumer.hard does).
    from zdq.consumer.child import _answer
    from zdq.errors import made_without_init

    reply = pickle.loads(_answer(cloudpickle.dumps, _raise_two_arg_error, (), None, "test"))
    assert reply[0] is False and reply[1] is None and len(reply) == 6, reply
    assert reply[2].endswith("TwoArgError") and reply[3] == "7: bad" and "_raise_two_arg_error" in reply[4]
    made = made_without_init(*reply[5])
    assert type(made) is TwoArgError and made.args == ("7: bad",)
    # One that pickles in a way of its own is sent as its text alone.
    reply = pickle.loads(_answer(cloudpickle.dumps, _raise_own_reduce, (), None, "test"))
    assert reply[1] is None and len(reply) == 5 and reply[2].endswith("_OwnReduce"), reply


def _raise_own_reduce() -> None:
    raise _OwnReduce("own way")

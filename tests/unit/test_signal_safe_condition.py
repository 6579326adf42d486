"""A Ctrl-C on the main thread never leaves the driver's lock held (reviewer 17).

``threading.Condition.__enter__`` is a Python frame: a signal's exception raised as it returned,
the lock just taken, left the lock held for good, and the driver's I/O thread, which takes it for
every result, stopped there with every task of the pool. :class:`zdq.futures.SignalSafeCondition`
enters and exits through its lock's own compiled methods. And ``results()`` interrupted as it
takes its backlog out loses none of it."""

from __future__ import annotations

import sys
import threading
from collections import deque
from typing import Any

import pytest

from zdq.futures import SignalSafeCondition


def _entered_under_an_interrupt(cond: threading.Condition) -> bool:
    """``with cond:`` with a KeyboardInterrupt raised as each Python frame of entering it returns
    (as a signal's handler would raise it there); whether the lock is left held."""

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if event == "call" and frame.f_code.co_name in ("__enter__", "__get__"):
            def on_return(frame: Any, event: str, arg: Any) -> Any:
                if event == "return":
                    raise KeyboardInterrupt
                return on_return
            return on_return
        return None

    sys.settrace(tracer)
    try:
        with cond:
            pass
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
    held = cond._is_owned()  # type: ignore[attr-defined]
    if held:
        cond.release()
    return held


def test_a_plain_condition_is_left_held_by_an_interrupt_as_it_is_entered() -> None:
    # What the driver's lock did: the reason for SignalSafeCondition.
    assert _entered_under_an_interrupt(threading.Condition())


@pytest.mark.parametrize("lock", [threading.RLock, threading.Lock], ids=["rlock", "lock"])
def test_a_signal_safe_condition_is_never_left_held(lock: Any) -> None:
    cond = SignalSafeCondition(lock())
    assert not _entered_under_an_interrupt(cond)
    assert cond.acquire(blocking=False)  # free (for a Lock, taken by no one)
    cond.release()


def test_entering_a_signal_safe_condition_runs_no_python_frame() -> None:
    """Reviewer 19: the methods were looked up through a Python ``__get__``, where a signal's
    exception could leave the ``with`` line (before the lock was taken) and skip what followed it."""
    frames: list[str] = []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if event == "call":
            frames.append(frame.f_code.co_name)
        return None

    cond = SignalSafeCondition()
    sys.settrace(tracer)
    try:
        with cond:
            with cond:  # an RLock: taken twice
                pass
    finally:
        sys.settrace(None)
    assert frames == [] and not cond._is_owned()  # type: ignore[attr-defined]


def test_a_signal_safe_condition_is_still_a_condition() -> None:
    cond = SignalSafeCondition()
    with cond:
        assert cond._is_owned()  # type: ignore[attr-defined]
        assert cond.wait(0.01) is False  # gives the lock back while it waits, and takes it again
        assert cond.wait_for(lambda: True, timeout=0.01)
        cond.notify_all()  # only its owner may
    assert not cond._is_owned()  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError):
        cond.notify()


def test_results_interrupted_as_it_takes_its_backlog_out_loses_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reviewer 17: a KeyboardInterrupt between taking the backlog out of ``kept`` and naming it
    lost it for good (11,000 of 20,000 results). The backlog is named before it leaves."""
    import zdq.client.driver.outcomes as om

    from .test_driver_ledger import make

    outcomes = make().outcomes
    for i in range(5):
        outcomes.intake(0, 0, 9, b"c1", 10 * i, [i], {})
        outcomes.settle_all()
    raised: list[int] = []

    def interrupted(*items: Any) -> deque[Any]:
        if not raised:
            raised.append(1)
            raise KeyboardInterrupt
        return deque(*items)

    monkeypatch.setattr(om, "deque", interrupted)
    with pytest.raises(KeyboardInterrupt):
        outcomes.results_for([b"c1"])
    assert raised and not outcomes.reading
    assert outcomes.results_for([b"c1"]) == {0: 0, 10: 1, 20: 2, 30: 3, 40: 4}


def test_results_interrupted_as_it_takes_the_lock_again_leaves_no_reader_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reviewer 19: a KeyboardInterrupt as ``results()``'s last ``with`` looked its lock's methods
    up (a Python ``__get__`` then) left ``reading`` set: the I/O thread stopped folding until the
    next call. The lookup runs no Python now; an exception at that line still clears the mark."""
    import zdq.client.driver.outcomes as om
    from zdq.futures import SignalSafeCondition

    from .test_driver_ledger import make

    outcomes = make().outcomes
    for i in range(5):
        outcomes.intake(0, 0, 9, b"c1", 10 * i, [i], {})
        outcomes.settle_all()
    real_fold = om._fold
    real_enter = vars(SignalSafeCondition)["__enter__"]
    armed: list[int] = []

    def fold_then_arm(into: dict[int, Any], kept: Any) -> None:
        real_fold(into, kept)
        armed.append(1)  # the backlog folded: the next lookup of the lock's methods is the last with's

    def enter(condition: Any) -> Any:
        if armed and condition is outcomes.cond:
            armed.clear()
            raise KeyboardInterrupt
        return real_enter.__get__(condition)

    monkeypatch.setattr(om, "_fold", fold_then_arm)
    monkeypatch.setattr(SignalSafeCondition, "__enter__", property(enter))
    outcomes.start_folding()
    with pytest.raises(KeyboardInterrupt):
        outcomes.results_for([b"c1"])
    assert not outcomes.reading and not outcomes.cond._is_owned()  # type: ignore[attr-defined]
    monkeypatch.setattr(SignalSafeCondition, "__enter__", real_enter)
    assert outcomes.results_for([b"c1"]) == {0: 0, 10: 1, 20: 2, 30: 3, 40: 4}

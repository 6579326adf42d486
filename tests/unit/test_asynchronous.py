"""zdq.client.asynchronous's pure parts: when a pool's call goes off the loop, and the errors that
say what to write (the cluster tests are tests/test_async_clients.py)."""

from __future__ import annotations

from typing import Any

from zdq.client import asynchronous


class _Pool:
    _own_client = None

    def __init__(self, asynchronous_: bool) -> None:
        self._asynchronous = asynchronous_
        self.calls: list[tuple[Any, ...]] = []

    @asynchronous.off_loop_when_async
    def close(self, timeout: float = 1.0) -> str:
        self.calls.append((timeout,))
        return "closed"


def test_off_the_loop_a_call_runs_as_it_is() -> None:
    """Off an event loop (a plain thread, a supervisor, a finalizer), even an asynchronous pool's
    call runs at once: what zdq's own threads call is never turned into an awaitable."""
    for flag in (False, True):
        pool = _Pool(flag)
        assert pool.close(timeout=2.0) == "closed"
        assert pool.calls == [(2.0,)]
    assert not asynchronous.on_event_loop()


def test_with_no_twin_the_function_runs_as_it_is() -> None:
    assert asynchronous.with_twin(None, divmod, 7, 2) == (3, 1)


def test_only_a_client_is_asynchronous() -> None:
    assert not asynchronous.is_asynchronous(None)
    assert not asynchronous.is_asynchronous(object())


def test_the_errors_say_what_to_write() -> None:
    error = asynchronous.not_started("QueuePool", "pool-a")
    assert isinstance(error, TypeError)
    assert "await QueuePool(client, ...)" in str(error) and "async with QueuePool(client, ...)" in str(error)
    assert "pool-a" in str(error)
    assert "use `async with`, not `with`" in str(asynchronous.sync_with("ConsumerPool"))

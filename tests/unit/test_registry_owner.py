"""How an attaching pool tells that a registered pool's owner process is dead or dying, from its
/proc entries (issue 23 point 3: a program restarted at once after its driver was SIGKILLed must
not attach to the dead driver's queues, which the scheduler has not yet seen go). The process
side, with a real killed driver, is in tests/test_restart_faults.py."""

from __future__ import annotations

import os

from zdq.client import registry
from zdq.client.registry import OwnerProcess, _judge, _stat_fields, owner_state

#: /proc/PID/stat of a sleeping process whose name holds a space and a paren, started at tick 4242.
_STAT = "123 (a (b) c) S 1 123 123 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 4242 1000 10 0 0 0"


def _fields(state: str = "S", flags: int = 4194560, started: str = "4242") -> list[str]:
    fields = _stat_fields(_STAT)
    fields[0], fields[6], fields[19] = state, str(flags), started
    return fields


def test_the_fields_after_a_process_name_with_spaces_and_parens_are_read_in_order() -> None:
    fields = _stat_fields(_STAT)
    assert fields[0] == "S" and fields[6] == "4194560" and fields[19] == "4242"


def test_a_running_owner_is_alive() -> None:
    assert _judge(_fields(), "SigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\n", "4242") == "alive"


def test_an_owner_that_is_exiting_a_zombie_or_killed_but_not_yet_gone_is_dead() -> None:
    assert _judge(_fields(flags=4194560 | 0x4), "", "4242") == "dead"  # PF_EXITING: freeing its memory
    assert _judge(_fields(state="Z"), "", "4242") == "dead"
    assert _judge(_fields(), "SigPnd:\t0000000000000000\nShdPnd:\t0000000000000100\n", "4242") == "dead"  # SIGKILL


def test_a_pid_reused_by_a_later_process_is_not_the_owner() -> None:
    assert _judge(_fields(started="9999"), "", "4242") == "dead"


def test_this_process_is_alive_and_an_owner_elsewhere_is_unknown() -> None:
    here = OwnerProcess.here()
    if not here.host:  # no /proc: every owner is unknown, and the pool looks again after OWNER_SETTLE
        assert owner_state(here) == "unknown"
        return
    assert here.pid == os.getpid() and owner_state(here) == "alive"
    assert owner_state(OwnerProcess("another-host:1", here.pid, here.started)) == "unknown"
    assert owner_state(OwnerProcess()) == "unknown"  # a record published without its owner's process
    assert registry.OWNER_SETTLE > 0

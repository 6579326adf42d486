"""The throttle of warnings a sender can repeat at will (the monitor's bad reports, the brokers'
refused handshakes): one line per sender a period, a bounded table, a bounded log."""

from __future__ import annotations

from zdq.reporting import Throttle


def test_a_sender_is_logged_once_a_period_however_often_it_repeats() -> None:
    throttle = Throttle(60.0)
    logged = [t for t in range(0, 300) if throttle.due("10.0.0.7", float(t))]
    assert logged == [0, 60, 120, 180, 240]


def test_senders_are_throttled_apart() -> None:
    throttle = Throttle(60.0)
    assert throttle.due("10.0.0.7", 0.0) and throttle.due("10.0.0.8", 1.0)
    assert not throttle.due("10.0.0.7", 2.0) and not throttle.due("10.0.0.8", 2.0)


def test_a_flood_from_more_senders_than_it_remembers_still_logs_at_most_kept_lines_a_period() -> None:
    """Forgetting a sender early would let one that comes back log again: with more senders than
    the table holds, the new ones wait until the old ones' period is over."""
    throttle = Throttle(60.0, kept=100)
    lines = 0
    for attempt in range(100_000):  # 1,000 addresses, each a hundred times, within one period
        lines += throttle.due(f"10.0.{attempt % 1000 // 256}.{attempt % 256}", attempt * 0.0005)
    assert lines == 100
    assert len(throttle._logged) == 100
    # A period later the table has room again.
    assert throttle.due("10.9.9.9", 60.0 + 50.0)


def test_a_sender_logged_again_moves_behind_the_others_so_expiry_drops_only_the_stale() -> None:
    throttle = Throttle(10.0, kept=2)
    assert throttle.due("a", 0.0) and throttle.due("b", 5.0)
    assert throttle.due("a", 10.0)  # a's period is over: logged again, now newer than b
    assert not throttle.due("c", 12.0)  # both remembered within their period: no room
    assert throttle.due("c", 15.0)  # b's period is over: it is dropped, a is kept
    assert not throttle.due("a", 16.0)

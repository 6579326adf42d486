"""The driver's links alone: the state machine per broker, the round robin and its windows, the
receipts owed, and the snapshot other threads read (no socket, no thread)."""

from __future__ import annotations

import time

from zdq.client.driver.links import STALLED, Links, LinkState, explain_full, names_down


def make(n: int = 3) -> Links:
    return Links([f"tcp://h:{i}" for i in range(n)], [f"w{i}" for i in range(n)], time.monotonic())


def test_every_link_starts_up_and_unheard() -> None:
    links = make()
    assert [view.state for view in links.views] == [LinkState.UP] * 3
    assert links.silent() == [0, 1, 2]


def test_a_link_is_heard_once_its_broker_answers_after_the_connection() -> None:
    links = make()
    links[1].seen = links[1].connected_at + 0.001
    assert links.silent() == [0, 2] and links[1].heard


def test_chunks_go_round_robin_over_the_brokers() -> None:
    links = make()
    assert [links.pick(window=5) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    assert [link.unconfirmed for link in links.links] == [2, 2, 2]


def test_a_full_window_that_is_confirming_holds_the_round_robin() -> None:
    links = make(2)
    links[0].unconfirmed = 2
    links[0].confirmed_at = time.monotonic()
    assert links.pick(window=2) is None and links[1].unconfirmed == 0


def test_a_stalled_broker_is_passed_over() -> None:
    links = make(2)
    links[0].unconfirmed = 2
    links[0].confirmed_at = time.monotonic() - STALLED - 0.1
    assert links.pick(window=2) == 1


def test_a_down_broker_is_passed_over() -> None:
    links = make(2)
    links.lost(0)
    assert [links.pick(window=5) for _ in range(3)] == [1, 1, 1]


def test_no_broker_is_picked_when_all_are_down_or_full() -> None:
    links = make(2)
    links.lost(0)
    links[1].unconfirmed = 1
    links[1].confirmed_at = time.monotonic() - STALLED - 1
    assert links.pick(window=1) is None


def test_a_chunk_that_could_not_be_sent_gives_its_slot_back() -> None:
    links = make(2)
    b = links.pick(window=1)
    assert b == 0
    links.unsent(b)
    assert links[0].unconfirmed == 0 and links.rr == 1


def test_a_lost_broker_is_down_its_window_and_receipts_cleared() -> None:
    links = make()
    links[0].unconfirmed, links[0].racks = 2, [5, 6]
    assert links.lost(0) is True
    assert links[0].state is LinkState.DOWN and links[0].unconfirmed == 0 and links[0].racks == []
    assert links.views[0].state is LinkState.DOWN


def test_losing_a_broker_twice_does_nothing_the_second_time() -> None:
    links = make()
    links.lost(0)
    assert links.lost(0) is False


def test_a_broker_placed_again_is_recovering_at_its_new_endpoint() -> None:
    links = make()
    links.lost(0)
    now = time.monotonic()
    links.reconnected(0, "tcp://new:1", "w9", now)
    link = links[0]
    assert link.state is LinkState.RECOVERING and link.endpoint == "tcp://new:1" and link.worker == "w9"
    assert not link.heard and link.connected_at == now and links.views[0].endpoint == "tcp://new:1"


def test_a_broker_placed_again_without_being_lost_first_starts_over() -> None:
    links = make()
    links[0].unconfirmed, links[0].racks = 3, [1]
    links.reconnected(0, "tcp://new:1", "", time.monotonic())
    assert links[0].unconfirmed == 0 and links[0].racks == [] and links[0].state is LinkState.RECOVERING


def test_a_recovering_broker_that_answers_is_up() -> None:
    links = make()
    links.reconnected(0, "tcp://new:1", "", time.monotonic())
    links.answered(links[0])
    assert links[0].state is LinkState.UP and links.views[0].state is LinkState.UP


def test_a_recovering_broker_silent_past_the_connect_timeout_is_unreachable() -> None:
    links = make()
    start = time.monotonic()
    links.reconnected(0, "tcp://new:1", "", start)
    assert links.due_unreachable(start + 1.0, connect_timeout=2.0) == []
    due = links.due_unreachable(start + 2.0, connect_timeout=2.0)
    assert due == [links[0]] and links[0].state is LinkState.UNREACHABLE
    assert links.due_unreachable(start + 9.0, connect_timeout=2.0) == []  # once


def test_a_recovering_broker_heard_in_time_is_never_unreachable() -> None:
    links = make()
    start = time.monotonic()
    links.reconnected(0, "tcp://new:1", "", start)
    links[0].seen = start + 0.5
    assert links.due_unreachable(start + 5.0, connect_timeout=2.0) == []


def test_an_unreachable_broker_that_answers_at_last_is_up_again() -> None:
    links = make()
    start = time.monotonic()
    links.reconnected(0, "tcp://new:1", "", start)
    links.due_unreachable(start + 5, connect_timeout=1)
    links.answered(links[0])
    assert links[0].state is LinkState.UP


def test_all_unreachable_is_true_only_when_every_link_is() -> None:
    links = make(2)
    start = time.monotonic()
    for i in range(2):
        links.reconnected(i, f"tcp://new:{i}", "", start)
    links.due_unreachable(start + 5, connect_timeout=1)
    assert links.all_unreachable()
    links.answered(links[1])
    assert not links.all_unreachable()


def test_a_reroute_makes_a_new_connection_unless_the_broker_is_down() -> None:
    links = make()
    links[0].seen = time.monotonic()
    now = time.monotonic() + 1
    assert links.rerouted(0, now) and links[0].connected_at == now and not links[0].heard
    links.lost(1)
    assert links.rerouted(1, now) is False


def test_chunks_resolved_after_a_reroute_leave_the_window() -> None:
    links = make()
    links[0].unconfirmed = 3
    links.resolved(0, 2)
    assert links[0].unconfirmed == 1


def test_receipts_are_taken_for_brokers_up_and_dropped_for_the_others() -> None:
    links = make()
    links[0].racks = [1, 2]
    links[2].racks = [3]
    links.lost(2)
    links[2].racks = [4]  # owed to a broker down: dropped, not sent
    assert links.take_racks() == [(0, (1, 2))]
    assert all(link.racks == [] for link in links.links)


def test_the_snapshot_is_replaced_whole_and_never_changes_once_published() -> None:
    links = make()
    before = links.views
    links[0].unconfirmed = 4
    assert before[0].unconfirmed == 0 and links.views is before
    links.publish()
    assert links.views is not before and links.views[0].unconfirmed == 4


def test_the_snapshot_names_the_queues_down() -> None:
    links = make()
    links.lost(1)
    assert names_down(links.views, ["a", "b", "c"]) == ["b"]


def test_a_full_buffer_is_explained_by_queues_down_and_stalled() -> None:
    links = make()
    links.lost(1)
    links[0].unconfirmed = 2
    links[0].confirmed_at = time.monotonic() - 10
    links.publish()
    why = explain_full(links.views, ["a", "b", "c"], window=2, now=time.monotonic())
    assert "queues b are down" in why and "queues a have confirmed nothing" in why
    assert explain_full(make().views, ["a", "b", "c"], window=2, now=time.monotonic()) == ""


def test_a_brokers_silence_is_measured_up_to_the_io_threads_last_tick_however_late_it_is_read() -> None:
    links = Links(["tcp://h:0", "tcp://h:1"], ["", ""], now=100.0)
    links[0].seen = 103.0
    links.ticked(105.0)
    assert [view.silence for view in links.views] == [2.0, 5.0]
    links.lost(1)  # a state change publishes, and measures no further than the last tick
    assert [view.silence for view in links.views] == [2.0, 5.0]
    links[0].seen = 106.0  # heard after the tick: silent for none of it
    links.publish()
    assert links.views[0].silence == 0.0


def test_after_the_io_thread_did_not_run_no_links_clock_counts_that_time() -> None:
    """The brokers' messages of the pause wait unread: a broker heard before is heard now, one
    placed again keeps its whole connect-timeout after it, and none is a stalled one for it."""
    links = Links(["tcp://h:0", "tcp://h:1"], ["", ""], now=100.0)
    links[0].seen = 101.0
    links[0].unconfirmed = 2
    links.reconnected(1, "tcp://new:1", "", 102.0)
    links.paused(gap=40.0, now=142.5)
    links.ticked(142.5)
    # Heard before: heard now. Placed again at 102, not heard: its clock moved on by the pause.
    assert [view.silence for view in links.views] == [0.0, 0.5]
    assert links[0].heard and not links[1].heard and links[1].state is LinkState.RECOVERING
    assert links.due_unreachable(142.5 + 1.0, connect_timeout=2.0) == []
    assert links.due_unreachable(142.5 + 2.0, connect_timeout=2.0) == [links[1]]
    assert links[0].confirmed_at == 140.0  # its last confirm, at 100, moved on by the pause

"""A durable queue's CONFIRMs wait until a flush covers their chunks' commit
(:class:`zdq.broker.confirms.Unflushed`, issue 26 point 5, design 2): never sent before, never held
past their bound."""

from __future__ import annotations

import math

from zdq.broker.confirms import Unflushed

D = b"d" * 16


def test_confirms_of_a_commit_move_on_only_once_a_later_flush_covers_it() -> None:
    u = Unflushed(0.002)
    held = u.hold(commit=7, now=10.0)
    held[(D, 1)] = 100
    held[(D, 2)] = 101
    assert not u.covered(6)  # a flush of the commits before (commit 7's own data flush) is not enough
    assert u.covered(7) and u.covered(8)  # the next commit's data flush, or an explicit flush
    assert u.due == 10.002  # the bound: flushed by the loop itself then
    taken, since = u.take()
    assert taken == {(D, 1): 100, (D, 2): 101} and since == 10.0
    assert not u.held and u.due == math.inf


def test_a_later_round_keeps_the_first_ones_bound_and_waits_for_its_own_commit() -> None:
    u = Unflushed(0.002)
    u.hold(commit=7, now=10.0)[(D, 1)] = 100
    # The broker moves commit 7's CONFIRMs on as soon as a later commit covers it; were they still
    # held when the next round is, both would wait for that round's commit to be covered.
    u.hold(commit=9, now=10.001)[(D, 2)] = 101
    assert u.commit == 9 and not u.covered(8) and u.covered(9)
    assert u.due == 10.002 and u.since == 10.0  # the first one's bound holds


def test_results_first_confirm_a_chunk_and_an_empty_hold_starts_a_new_bound() -> None:
    u = Unflushed(0.002)
    u.hold(commit=3, now=5.0)[(D, 1)] = 100
    u.held.pop((D, 1))  # its RESULTS reached the driver: they confirm it
    assert not u.held
    u.hold(commit=4, now=6.0)[(D, 2)] = 101
    assert u.since == 6.0 and u.due == 6.002

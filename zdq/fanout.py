"""Which queues each consumer serves: at most ``fan-out`` of them, and every queue by someone.

Connecting every consumer to every broker costs connections, heartbeats and CURVE handshakes that
grow with consumers × brokers. Instead, consumer slot ``i`` of ``n`` serves a window of
consecutive queues that starts at ``i * queues // n``: the windows of neighbouring slots start at
most ``ceil(queues / n)`` apart, and a window is never narrower than that, so together they cover
every queue, each about equally often. The assignment depends only on the slot, so a consumer
placed again (its worker was lost) serves the same queues, and every queue stays served.

>>> [served_queues(i, 4, 8, fan_out=2) for i in range(4)]
[[0, 1], [2, 3], [4, 5], [6, 7]]
>>> served_queues(0, 1, 8, fan_out=2)  # one consumer serves every queue, whatever fan-out says
[0, 1, 2, 3, 4, 5, 6, 7]
>>> served_queues(3, 5, 3, fan_out=2)
[1, 2]
"""

from __future__ import annotations

__all__ = ["served_queues"]


def served_queues(slot: int, n_consumers: int, n_queues: int, *, fan_out: int) -> list[int]:
    """The queues (by index) that consumer ``slot`` of ``n_consumers`` connects to."""
    if not 0 <= slot < n_consumers or n_queues < 1 or fan_out < 1:
        raise ValueError(f"no fan-out for consumer {slot} of {n_consumers} over {n_queues} queues (fan-out {fan_out})")
    width = min(n_queues, max(fan_out, -(-n_queues // n_consumers)))
    start = slot * n_queues // n_consumers
    return sorted((start + k) % n_queues for k in range(width))

"""Moved to :mod:`zdq.client.queue_pool`; this path re-exports it for one release."""

from zdq.client.queue_pool import DeadLetterInfo, Durability, QueuePool, current_pool

__all__ = ["Durability", "QueuePool", "DeadLetterInfo", "current_pool"]

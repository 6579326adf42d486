"""Moved to :mod:`zdq.client.consumer_pool`; this path re-exports it for one release."""

from zdq.client.consumer_pool import EARLIER, NOT_RUN, ConsumerPool

__all__ = ["ConsumerPool", "EARLIER", "NOT_RUN"]

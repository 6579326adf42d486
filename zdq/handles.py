"""Moved to :mod:`zdq.client.handles`; this path re-exports it for one release."""

from zdq.client.handles import QueueHandle

__all__ = ["QueueHandle"]

"""The driver's old home, kept for one release: it lives in :mod:`zdq.client.driver` now."""

from zdq.client.driver import NO_CONSUMER, Driver, LinkState, first_task_id

__all__ = ["Driver", "LinkState", "first_task_id", "NO_CONSUMER"]

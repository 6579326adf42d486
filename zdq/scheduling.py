"""Moved to :mod:`zdq.client.schedules`; this path re-exports it for one release."""

from zdq.client.schedules import Schedule, cancel_schedule, list_schedules, make_schedule

__all__ = ["Schedule", "cancel_schedule", "list_schedules", "make_schedule"]

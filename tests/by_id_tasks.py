"""Tasks whose exception class a process without the test suite's code cannot import
(tests/test_by_id.py asks for their state from such a process)."""

from __future__ import annotations


class AppError(Exception):
    """An application's own exception: pickled by reference to this module."""


def app_fail(message: str) -> None:
    raise AppError(message)

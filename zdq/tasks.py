"""Moved to :mod:`zdq.codec.tasks`; this path re-exports it for one release, then goes.

Every name below is the codec's own object (``zdq.tasks.TaskOptions is
zdq.codec.tasks.TaskOptions``): ``isinstance`` checks and identity tests hold across both paths.
To monkeypatch a function, patch it where it lives now, in :mod:`zdq.codec.tasks`.

``_cancelled`` is kept because chunks pickled before the move name it here (a durable queue may
hold a cancelled task's placeholder).
"""

from __future__ import annotations

from zdq.codec.tasks import (
    CALLS,
    CANCELLED,
    ITEMS,
    PICKLED,
    TASKS,
    Call,
    Careful,
    Chunk,
    Loop,
    Task,
    TaskOptions,
    call_task,
    callers,
    cancel_in_chunk,
    cancelled_entry,
    check_calls,
    dumps_chunk,
    dumps_task,
    is_cancelled,
    item_task,
    loads_chunk,
    own_options,
    run_entries,
    split_chunk,
)
from zdq.codec.tasks import _cancelled as _cancelled

__all__ = [  # noqa: RUF022 - grouped by role, as in zdq.codec.tasks
    # kinds and shapes
    "TASKS",
    "CALLS",
    "ITEMS",
    "PICKLED",
    "Task",
    "TaskOptions",
    "Chunk",
    "split_chunk",
    # building
    "call_task",
    "item_task",
    "check_calls",
    # encoding and decoding
    "dumps_task",
    "dumps_chunk",
    "loads_chunk",
    # cancelled tasks
    "CANCELLED",
    "cancelled_entry",
    "is_cancelled",
    "cancel_in_chunk",
    # running
    "Call",
    "Careful",
    "Loop",
    "callers",
    "run_entries",
    "own_options",
]

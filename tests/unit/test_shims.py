"""The codec's old paths (zdq.tasks, zdq.serialization, zdq.timing, zdq.schedules, zdq.chunking)
re-export the codec's own objects for one release: same names, same objects."""

from __future__ import annotations

import importlib
import pickle

import pytest

SHIMS = {
    "zdq.tasks": "zdq.codec.tasks",
    "zdq.serialization": "zdq.codec.results",
    "zdq.timing": "zdq.codec.timing",
    "zdq.schedules": "zdq.codec.schedules",
    "zdq.chunking": "zdq.codec.chunking",
}


@pytest.mark.parametrize(("old", "new"), SHIMS.items())
def test_an_old_path_offers_every_public_name_it_had_as_the_codecs_same_object(old: str, new: str) -> None:
    shim, codec = importlib.import_module(old), importlib.import_module(new)
    # What the codecs gained since the move is offered at their new path only.
    assert set(codec.__all__) - set(shim.__all__) <= {"loads_earlier", "expiry_of", "NAME_MAX", "check_schedule_name", "error_info", "dumps_whole_results", "fit_results"}
    for name in shim.__all__:
        assert getattr(shim, name) is getattr(codec, name), f"{old}.{name} is not {new}.{name}"
    assert shim.__doc__ is not None and f"Moved to :mod:`{new}`" in shim.__doc__


def test_objects_made_through_an_old_path_are_instances_of_the_codecs_classes() -> None:
    from zdq.codec.chunking import Chunking
    from zdq.codec.results import ErrorInfo
    from zdq.codec.tasks import TaskOptions
    from zdq.codec.timing import Timing
    from zdq.tasks import TaskOptions as OldTaskOptions
    from zdq.timing import timing_of

    assert isinstance(OldTaskOptions(retries=1), TaskOptions)
    assert isinstance(timing_of(None, None, 3), Timing)
    assert isinstance(importlib.import_module("zdq.chunking").Chunking(1, 1, 1, 1), Chunking)
    assert importlib.import_module("zdq.serialization").ErrorInfo is ErrorInfo


def test_what_older_code_imports_from_the_old_paths_besides_the_public_names_is_still_there() -> None:
    from zdq.codec import schedules, tasks

    old_tasks = importlib.import_module("zdq.tasks")
    old_schedules = importlib.import_module("zdq.schedules")
    assert old_tasks._cancelled is tasks._cancelled  # named by pickles of cancelled placeholders
    assert old_schedules._missed is schedules._missed  # zdq.scheduling reads it there


def test_a_cancelled_placeholder_pickled_before_the_move_is_still_recognised() -> None:
    from zdq.codec.tasks import TASKS, cancelled_entry, is_cancelled, loads_chunk

    old = pickle.dumps((0, TASKS, [cancelled_entry(TASKS)], None), protocol=2).replace(b"zdq.codec.tasks", b"zdq.tasks")
    assert is_cancelled(loads_chunk(old)[2][0])

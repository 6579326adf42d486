"""Tasks by name and the ``hard`` option, their pure parts: the name's form, its resolution, the
options' validation and merge, and options pickled before ``hard`` existed."""

from __future__ import annotations

import os.path
import pickle
import sys
from typing import Any

import pytest

from zdq.client.submit import TaskDefaults
from zdq.codec.tasks import (
    CALLS,
    ITEMS,
    TASKS,
    TaskOptions,
    call_parts,
    callers,
    careful_callers,
    check_calls,
    check_task_name,
    is_named,
    resolve_task_name,
)
from zdq.consumer.child import _resolve as resolve_in_child
from zdq.consumer.attempts import _with_limit
from zdq.errors import RemoteTaskError

#: ``pickle.dumps(TaskOptions(retries=2, time_limit=3.0), protocol=5)`` as written before ``hard``
#: was added (zdq at e531be2): durable queues hold such chunks.
OLD_OPTIONS = (
    b"\x80\x05\x95c\x00\x00\x00\x00\x00\x00\x00\x8c\x0fzdq.codec.tasks\x94\x8c\x0bTaskOptions\x94\x93\x94)"
    b"\x81\x94]\x94(K\x02G?\xb9\x99\x99\x99\x99\x99\x9aG@>\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c"
    b"\tException\x94\x93\x94\x85\x94G@\x08\x00\x00\x00\x00\x00\x00eb."
)


class Shapes:
    @staticmethod
    def area(w: int, h: int) -> int:
        return w * h


@pytest.mark.parametrize(
    "name", ["os.path:join", "a:b", "pkg.mod_2:Class.method", "_x._y:_z", "é:x", "paquet.modülé:fonction_é"]
)
def test_a_well_formed_task_name_is_accepted(name: str) -> None:
    check_task_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "os.path.join", ":join", "os.path:", "os..path:join", "os.path:join:x", "os path:join", "1os:join", "",
        ":", "a:", "os:path:join", "../x:y", "a/b:c", " os:join", "os:join ", "os:\tjoin", "a.:b", "a:b.",
    ],
)
def test_a_malformed_task_name_is_refused_with_the_form_it_needs(name: str) -> None:
    with pytest.raises(ValueError, match="package.module:function"):
        check_task_name(name)


def test_a_task_name_resolves_to_its_function_and_is_cached() -> None:
    assert resolve_task_name("os.path:join") is os.path.join
    assert resolve_task_name(f"{__name__}:Shapes.area")(2, 3) == 6
    before = resolve_task_name.cache_info().hits
    resolve_task_name("os.path:join")
    assert resolve_task_name.cache_info().hits == before + 1


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("zdq_no_such_module:f", "cannot import module 'zdq_no_such_module'"),
        ("os.path:no_such_fn", "module 'os.path' has no attribute 'no_such_fn'"),
        ("os:sep", "'sep' of module 'os' is not callable"),
    ],
)
def test_an_unknown_task_name_raises_an_import_error_naming_what_is_missing(name: str, said: str) -> None:
    with pytest.raises(ImportError, match=said):
        resolve_task_name(name)


@pytest.mark.parametrize(
    ("source", "said"),
    [
        ("raise RuntimeError('boom')\n", "RuntimeError: boom"),
        ("raise SystemExit('bye')\n", "SystemExit: bye"),
        ("import zdq_no_such_module_either\n", "No module named 'zdq_no_such_module_either'"),
    ],
)
def test_a_module_that_fails_at_import_raises_an_import_error_chained_from_its_own(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, source: str, said: str
) -> None:
    name = f"zdq_unit_broken_{abs(hash(source))}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = careful_callers(str.upper, "consumer C on worker W")
    with pytest.raises(ImportError) as info:
        calls[CALLS]((f"{name}:f",))
    assert f"cannot import module {name!r}: {said} (on consumer C on worker W)" in str(info.value)
    assert info.value.name == name and info.value.__cause__ is not None  # the module's own error
    assert name not in sys.modules


@pytest.mark.parametrize("name", ["zdq_no_such_module:f", "os.path:no_such_fn", "os:sep"])
def test_the_child_process_resolves_names_with_the_workers_messages(name: str) -> None:
    """The child imports nothing of zdq (it starts in the time Python takes), so it carries its own
    resolver: it must say what the worker's says."""
    with pytest.raises(ImportError) as in_worker:
        careful_callers(str.upper, "consumer C on worker W")[CALLS]((name,))
    with pytest.raises(ImportError) as in_child:
        resolve_in_child(name, "consumer C on worker W")
    assert str(in_child.value) == str(in_worker.value)
    assert in_child.value.name == in_worker.value.name


def test_remote_task_errors_pickle_whole() -> None:
    error = RemoteTaskError("pkg.Kind", "a: message", "Traceback ...")
    again = pickle.loads(pickle.dumps(error, protocol=5))
    assert (str(again), again.type_name, again.remote_traceback) == (str(error), "pkg.Kind", "Traceback ...")


def test_a_consumers_time_limit_fills_options_without_one_and_leaves_the_others() -> None:
    hard = TaskOptions(time_limit=2.0, hard=True)
    filled = _with_limit(TaskOptions(expires=5.0, retries=1), hard)
    assert filled == TaskOptions(expires=5.0, retries=1, time_limit=2.0, hard=True)
    soft = _with_limit(TaskOptions(expires=5.0), TaskOptions(time_limit=3.0))
    assert soft == TaskOptions(expires=5.0, time_limit=3.0)


def test_the_careful_callers_resolve_names_and_name_the_consumer() -> None:
    calls = careful_callers(str.upper, "consumer C on worker W")
    assert calls[CALLS](("os.path:join", "a", "b")) == os.path.join("a", "b")
    assert calls[TASKS](("os.path:join", ("a", "b"))) == os.path.join("a", "b")
    assert calls[TASKS](("os.path:join", ("a",), {})) == "a"
    assert calls[TASKS]((None, "item")) == "ITEM"
    assert calls[CALLS]((os.path.join, "a")) == "a"
    with pytest.raises(ImportError, match=r"\(on consumer C on worker W\)"):
        calls[CALLS](("os.path:nope",))
    # The fast callers are untouched: a name there fails as a string would, and the runner's
    # careful path takes over (is_named says when).
    with pytest.raises(TypeError):
        callers(str.upper)[CALLS](("os.path:join", "a"))


def test_is_named_and_call_parts_tell_entries_apart() -> None:
    assert is_named(CALLS, ("a:b", 1)) and is_named(TASKS, ("a:b", ()))
    assert not is_named(CALLS, (len, 1)) and not is_named(ITEMS, "a:b") and not is_named(TASKS, (None, "a:b"))
    # A name stays a name: the child process imports it, under the task's hard limit.
    assert call_parts(CALLS, ("os.path:join", "a", "b"), str.upper) == ("os.path:join", ("a", "b"), None)
    assert call_parts(TASKS, ("os.path:join", ["a"]), str.upper) == ("os.path:join", ("a",), None)
    assert call_parts(TASKS, (len, ["x"], {}), str.upper) == (len, ("x",), None)
    assert call_parts(TASKS, (None, "it"), str.upper) == (str.upper, ("it",), None)
    assert call_parts(ITEMS, "it", str.upper) == (str.upper, ("it",), None)


def test_check_calls_takes_task_names_and_refuses_malformed_ones() -> None:
    check_calls([("os.path:join", "a"), (len, "x")])
    with pytest.raises(ValueError, match="batch_submit item 3: "):
        check_calls([("os.path.join", "a")], first=3)
    with pytest.raises(TypeError, match="batch_submit item 0"):
        check_calls([(42, "a")])


def test_hard_needs_a_time_limit_and_a_bool() -> None:
    assert TaskOptions(time_limit=1.0, hard=True).hard
    with pytest.raises(ValueError, match="give a time_limit"):
        TaskOptions(hard=True)
    with pytest.raises(TypeError, match="hard must be True or False"):
        TaskOptions(time_limit=1.0, hard=1)  # type: ignore[arg-type]


def test_options_pickled_before_hard_existed_load_with_hard_off() -> None:
    options = pickle.loads(OLD_OPTIONS)
    assert options == TaskOptions(retries=2, time_limit=3.0) and options.hard is False
    hard = TaskOptions(retries=1, time_limit=2.0, hard=True)
    assert pickle.loads(pickle.dumps(hard, protocol=5)) == hard


def test_hard_merges_over_the_pools_defaults() -> None:
    plain = TaskDefaults(TaskOptions())
    assert plain.merge() is None
    with pytest.raises(ValueError, match="give a time_limit"):
        plain.merge(hard=True)
    assert plain.merge(time_limit=2, hard=True) == TaskOptions(time_limit=2.0, hard=True)
    limited = TaskDefaults(TaskOptions(time_limit=5.0))
    assert limited.merge(hard=True) == TaskOptions(time_limit=5.0, hard=True)
    hard = TaskDefaults(TaskOptions(time_limit=5.0, hard=True))
    assert hard.merge() == TaskOptions(time_limit=5.0, hard=True)
    assert hard.merge(hard=False) == TaskOptions(time_limit=5.0)
    assert hard.merge_all(time_limit=None) is None  # lifting the limit lifts hard with it

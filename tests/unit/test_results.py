"""Results, sealing and what cannot be pickled (zdq.codec.results): pure, no cluster."""

from __future__ import annotations

import hashlib
import pickle
import sys
import threading
import types

import pytest

from zdq.codec import seal as seal_module
from zdq.codec.results import (
    PROTOCOL,
    ErrorInfo,
    all_scalars,
    check_picklable,
    dumps_results,
    dumps_whole_results,
    error_info,
    error_to_exception,
    fit_results,
    loads_earlier,
    loads_results,
    seal,
    unseal,
)
from zdq.codec.seal import MAGIC, OVERHEAD
from zdq.codec.tasks import (
    CALLS,
    TASKS,
    TaskOptions,
    call_task,
    cancelled_entry,
    is_cancelled,
    loads_chunk,
)
from zdq.errors import ProtocolError, RemoteTaskError, SerializationError

from ..tasks import add

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
LARGE = bytes(range(256)) * 4  # sealed with GCM (small payloads keep the BLAKE2b tag)


def _info(exc: BaseException, traceback: str = "") -> ErrorInfo:
    return ErrorInfo(exc, f"builtins.{type(exc).__name__}", str(exc), traceback)


# -- sealing ---------------------------------------------------------------------------------------
def test_without_a_key_a_payload_is_its_data_untouched() -> None:
    assert seal(None, b"data") == b"data"
    assert bytes(unseal(None, b"data")) == b"data"


def test_a_sealed_payload_carries_a_tag_and_unseals_to_its_data_with_the_same_key() -> None:
    for data in (b"data", LARGE):
        sealed = seal(KEY, data)
        assert len(sealed) == (OVERHEAD if data is LARGE else 16) + len(data) and sealed.endswith(data)
        assert bytes(unseal(KEY, sealed)) == data
        assert bytes(unseal(KEY, bytearray(sealed))) == data  # any buffer: what a socket hands over
        assert bytes(unseal(KEY, memoryview(sealed))) == data


def test_a_key_or_a_payload_given_as_another_buffer_seals_and_unseals_as_bytes_would() -> None:
    for data in (b"data", LARGE):
        sealed = seal(bytearray(KEY), data)  # the sealers are kept by key: an unhashable one is copied
        assert bytes(unseal(KEY, sealed)) == data and bytes(unseal(memoryview(KEY), sealed)) == data
        if len(sealed) % 2 == 0:  # a view of two-byte items: its bytes are read, in order
            assert bytes(unseal(KEY, memoryview(sealed).cast("H"))) == data
    with pytest.raises(ProtocolError, match="contiguous"):
        unseal(KEY, memoryview(seal(KEY, LARGE) * 2).cast("H")[::2])


def test_a_payload_sealed_before_protocol_7_a_keyed_blake2b_tag_still_unseals() -> None:
    data = b"stored by a durable queue before the upgrade"
    old = hashlib.blake2b(data, key=KEY, digest_size=16).digest() + data
    assert bytes(unseal(KEY, old)) == data
    with pytest.raises(ProtocolError, match="tag does not match"):
        unseal(OTHER_KEY, old)
    forged = bytearray(MAGIC + old)  # the new layout's marker in front of an old-layout payload
    with pytest.raises(ProtocolError, match="tag does not match"):
        unseal(KEY, forged)


def test_payloads_smaller_or_larger_than_gcm_suits_get_the_earlier_tag_and_unseal(monkeypatch: pytest.MonkeyPatch) -> None:
    small = b"a single task's chunk"
    assert seal(KEY, small) == hashlib.blake2b(small, key=KEY, digest_size=16).digest() + small
    monkeypatch.setattr(seal_module, "_GCM_MAX", len(LARGE) - 1)  # (the real limit, 2 GiB, is too large for a test)
    sealed = seal(KEY, LARGE)
    assert sealed == hashlib.blake2b(LARGE, key=KEY, digest_size=16).digest() + LARGE
    assert bytes(unseal(KEY, sealed)) == LARGE


def test_a_seal_whose_tag_salt_or_counter_is_changed_is_refused() -> None:
    sealed = seal(KEY, LARGE)
    for i in range(len(MAGIC), OVERHEAD):
        changed = bytearray(sealed)
        changed[i] ^= 1
        with pytest.raises(ProtocolError, match="tag does not match"):
            unseal(KEY, changed)


def test_unsealing_with_another_key_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="tag does not match"):
        unseal(OTHER_KEY, seal(KEY, b"data"))
    with pytest.raises(ProtocolError, match="tag does not match"):
        unseal(OTHER_KEY, seal(KEY, LARGE))


def test_a_payload_with_one_byte_changed_is_a_protocol_error() -> None:
    for data in (b"some data", LARGE):
        sealed = bytearray(seal(KEY, data))
        sealed[-1] ^= 1
        with pytest.raises(ProtocolError, match="tag does not match"):
            unseal(KEY, sealed)


def test_a_payload_shorter_than_its_tag_is_a_protocol_error_that_is_still_a_value_error() -> None:
    with pytest.raises(ProtocolError, match="too short"):
        unseal(KEY, b"short")
    with pytest.raises(ValueError):  # callers that caught ValueError still do
        unseal(KEY, b"")


# -- results ---------------------------------------------------------------------------------------
def test_results_round_trip_with_their_errors_by_index() -> None:
    errors = {1: _info(ValueError("boom"), "Traceback ...")}
    for key in (None, KEY):
        base, values, got = loads_results(dumps_results(40, [3, None, "x"], errors, key), key)
        assert (base, values) == (40, [3, None, "x"])
        assert list(got) == [1] and got[1].type_name == "builtins.ValueError" and got[1].message == "boom"
        assert isinstance(got[1].exception, ValueError)


def test_a_few_scalar_results_and_many_or_rich_ones_read_back_the_same() -> None:
    few = [1, 2.5, "s", b"b", None, True]
    many = list(range(100))
    rich = [{"a": [1, 2]}, (3, 4), {5}]
    for values in (few, many, rich):
        assert loads_results(dumps_results(0, values, {}))[1] == values


class _NullLike:
    """A value equal to ``None`` that is not ``None`` (a null object; ``unittest.mock.ANY``)."""

    def __eq__(self, other: object) -> bool:
        return other is None or other is self

    __hash__ = object.__hash__


def test_results_equal_to_none_come_back_as_themselves() -> None:
    """A chunk's results tested for being all None by ``==`` came back as ``[None] * n`` when they
    only compared equal to it (review of the fourth session: that encoding is gone)."""
    values = [_NullLike() for _ in range(40)]
    read = loads_results(dumps_results(7, values, {}, KEY), KEY)[1]
    assert all(type(v) is _NullLike for v in read)
    assert loads_results(dumps_results(7, [None] * 1000, {}, KEY), KEY) == (7, [None] * 1000, {})


class _NotABool:
    """A value whose ``== None`` is not a truth value (as a NumPy array's)."""

    def __eq__(self, other: object) -> bool:
        raise ValueError("the truth value is ambiguous")

    __hash__ = object.__hash__


def test_results_beside_nones_whose_equality_raises_are_written_as_any_results() -> None:
    values = [None] * 20 + [_NotABool()] + [None] * 20
    base, read, errors = loads_results(dumps_results(7, values, {}, KEY), KEY)
    assert (base, errors, read[:20], read[21:]) == (7, {}, [None] * 20, [None] * 20)
    assert type(read[20]) is _NotABool


class _Undescribed:
    """A result that neither pickles nor shows itself."""

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("no pickling")

    def __repr__(self) -> str:
        raise ValueError("no repr")


def test_a_result_that_neither_pickles_nor_shows_itself_is_that_tasks_error() -> None:
    base, values, errors = loads_results(dumps_results(3, [1, _Undescribed()], {}, KEY), KEY)
    assert (base, values) == (3, [1, None])
    assert "whose repr raised ValueError" in errors[1].message and "cannot be pickled" in errors[1].message


def test_results_sealed_with_one_key_are_refused_with_another() -> None:
    payload = dumps_results(1, [1], {}, KEY)
    with pytest.raises(ProtocolError, match="tag does not match"):
        loads_results(payload, OTHER_KEY)
    with pytest.raises(ProtocolError):
        loads_results(dumps_results(1, [1], {}), KEY)  # unsealed results where sealed ones are due


@pytest.mark.parametrize("obj", [[1, [], {}], (1, [], {}, None), ("1", [], {}), (1, (), {}), (1, [], []), 42])
def test_results_that_are_not_int_list_dict_are_a_protocol_error(obj: object) -> None:
    with pytest.raises(ProtocolError, match=r"results must be \(int, list, dict\)"):
        loads_results(pickle.dumps(obj, protocol=PROTOCOL))


def test_a_result_that_cannot_be_pickled_becomes_its_tasks_serialization_error_alone() -> None:
    lock = threading.Lock()
    _, values, errors = loads_results(dumps_results(10, [1, lock, "z"], {}))
    assert values == [1, None, "z"]
    assert list(errors) == [1] and errors[1].type_name == "zdq.errors.SerializationError"
    assert "cannot be pickled" in errors[1].message and "lock" in errors[1].message


def test_an_error_whose_exception_cannot_be_pickled_keeps_its_text_without_it() -> None:
    class Local(Exception):  # a class of a function's body: pickled by value, holding a lock
        def __init__(self) -> None:
            super().__init__("local failure")
            self.lock = threading.Lock()

    info = ErrorInfo(Local(), "tests.Local", "local failure", "Traceback: here")
    _, values, errors = loads_results(dumps_results(0, [None], {0: info}))
    assert errors[0] == ErrorInfo(None, "tests.Local", "local failure", "Traceback: here")


def test_results_larger_than_the_limit_lose_their_largest_values_first() -> None:
    small, big = "s" * 10, "b" * 50_000
    payload = dumps_results(100, [small, big, small], {}, None, max_bytes=10_000)
    assert len(payload) <= 10_000
    _, values, errors = loads_results(payload)
    assert values == [small, None, small]
    assert list(errors) == [1] and isinstance(errors[1].exception, SerializationError)
    assert "task 101" in errors[1].message and "the 10000 bytes a consumer's report may carry (max-message-size" in errors[1].message


def test_whole_results_are_those_of_dumps_results_when_they_fit_and_none_when_they_do_not() -> None:
    small, big = "s" * 10, "b" * 50_000
    assert dumps_whole_results(100, [small, big], {}, None, max_bytes=10_000) is None  # the consumer splits
    whole = dumps_whole_results(5, [1, 2], {}, KEY, max_bytes=1 << 20)
    assert whole is not None and unseal(KEY, whole) == unseal(KEY, dumps_results(5, [1, 2], {}, KEY))
    assert dumps_whole_results(0, [big], {}, None) is not None  # no limit


def test_results_whose_errors_alone_exceed_the_limit_fail_every_task() -> None:
    huge = {i: _info(ValueError("x"), "t" * 20_000) for i in range(3)}
    _, values, errors = loads_results(dumps_results(0, [None] * 3, huge, None, max_bytes=5_000))
    assert values == [None] * 3 and sorted(errors) == [0, 1, 2]
    assert all("more than the 5000 bytes a consumer's report may carry (max-message-size" in e.message for e in errors.values())


def test_results_within_the_limit_are_written_as_without_one() -> None:
    assert unseal(KEY, dumps_results(5, [1, 2], {}, KEY, max_bytes=1 << 20)) == unseal(KEY, dumps_results(5, [1, 2], {}, KEY))


# -- errors on the driver ----------------------------------------------------------------------------
def test_a_failure_that_travelled_as_itself_is_raised_as_itself_with_its_remote_traceback_noted_once() -> None:
    error = KeyError("k")
    info = _info(error, "Traceback (most recent call last):\n  boom\n")
    assert error_to_exception(info) is error
    assert error_to_exception(info) is error
    assert error.__notes__ == ["remote traceback (zdq consumer):\nTraceback (most recent call last):\n  boom"]


def test_a_failure_that_could_not_travel_is_a_remote_task_error_naming_its_type() -> None:
    exc = error_to_exception(ErrorInfo(None, "mod.Odd", "odd failure", ""))
    assert isinstance(exc, RemoteTaskError)
    assert "mod.Odd" in str(exc) and "odd failure" in str(exc)
    # It says why it stands in for mod.Odd; no traceback came: no note of one.
    assert len(exc.__notes__) == 1 and "mod.Odd, which could not travel back as itself" in exc.__notes__[0]


# -- what cannot be pickled ------------------------------------------------------------------------
def test_check_picklable_names_the_function_the_argument_or_the_keyword_that_fails() -> None:
    lock = threading.Lock()
    check_picklable(add, (1, 2), {"b": 3})  # all well: nothing raised
    with pytest.raises(SerializationError, match="cannot submit .*<lambda>.*its function"):
        check_picklable(lambda: lock, (), None)
    with pytest.raises(SerializationError, match="add: its argument 1"):
        check_picklable(add, (1, lock), None)
    with pytest.raises(SerializationError, match="add: its keyword argument 'b'"):
        check_picklable(add, (1,), {"b": lock})
    with pytest.raises(SerializationError, match="cannot put the item"):
        check_picklable(None, (lock,), None)


def test_only_builtin_scalars_count_as_scalars() -> None:
    assert all_scalars([1, 1.5, 1j, "s", b"b", True, None])
    assert all_scalars([])
    assert not all_scalars([1, [2]])
    assert not all_scalars([(1,)])

    class Int(int):
        pass

    assert not all_scalars([Int(1)])  # a subclass may pickle differently


# -- names that moved --------------------------------------------------------------------------------
def test_results_and_chunks_written_under_the_old_module_names_load_once_those_modules_are_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    info = ErrorInfo(None, "builtins.ValueError", "boom", "")
    new_results = pickle.dumps((3, [None], {0: info}), protocol=2)
    assert b"zdq.errors\nErrorInfo" in new_results  # where it lives now
    # As the two releases before this one wrote it: zdq.codec.results (which still names it)...
    codec_results = new_results.replace(b"zdq.errors\nErrorInfo", b"zdq.codec.results\nErrorInfo")
    assert loads_results(codec_results) == (3, [None], {0: info})
    # ... and zdq.serialization before them.
    old_results = new_results.replace(b"zdq.errors\nErrorInfo", b"zdq.serialization\nErrorInfo")
    old_options = pickle.dumps((1, CALLS, [(add, 1)], TaskOptions(retries=2)), protocol=2).replace(
        b"zdq.codec.tasks", b"zdq.tasks"
    )
    assert b"zdq.serialization" in old_results and b"zdq.tasks" in old_options
    # The shims gone (one release on): their modules hold none of these names any more.
    monkeypatch.setitem(sys.modules, "zdq.serialization", types.ModuleType("zdq.serialization"))
    monkeypatch.setitem(sys.modules, "zdq.tasks", types.ModuleType("zdq.tasks"))
    assert loads_results(old_results) == (3, [None], {0: info})
    assert loads_chunk(old_options) == (1, CALLS, [(add, 1)], TaskOptions(retries=2))


def test_a_cancelled_placeholder_pickled_under_the_old_name_is_still_a_cancelled_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chunk = (7, TASKS, [cancelled_entry(TASKS), call_task(add, (2,))], None)
    old = pickle.dumps(chunk, protocol=2).replace(b"zdq.codec.tasks", b"zdq.tasks")
    assert b"zdq.tasks" in old
    monkeypatch.setitem(sys.modules, "zdq.tasks", types.ModuleType("zdq.tasks"))
    _, _, entries, _ = loads_chunk(old)
    assert is_cancelled(entries[0]) and not is_cancelled(entries[1])


def test_a_name_missing_for_another_reason_raises_as_pickle_would() -> None:
    forged = pickle.dumps(TaskOptions(), protocol=2).replace(b"zdq.codec.tasks", b"zdq.nowhere")
    with pytest.raises(ModuleNotFoundError, match="zdq.nowhere"):
        loads_earlier(forged)
    chunk = pickle.dumps((1, CALLS, [], TaskOptions()), protocol=2).replace(b"zdq.codec.tasks", b"zdq.nowhere")
    with pytest.raises(ModuleNotFoundError, match="zdq.nowhere"):  # the consumer names the module to install
        loads_chunk(chunk)


def test_a_result_too_large_alone_is_not_said_to_be_too_large_beside_the_others() -> None:
    _, errors = fit_results(0, [b"x" * 20_000], {}, None, 10_000)
    assert "pickles to 20018 bytes, more than the 10000 bytes" in errors[0].message
    _, errors = fit_results(0, [b"x" * 6_000, 1, b"y" * 6_000], {}, None, 10_000)
    assert list(errors) == [0] or list(errors) == [2], errors
    assert "with the rest of its chunk's results, more than the 10000 bytes" in next(iter(errors.values())).message


def _workers_only_module() -> types.ModuleType:
    """A module this process imports only while the test packs results (as a worker would)."""
    module = types.ModuleType("zdq_test_results_workers_only")
    exec(
        "class Err(Exception):\n    pass\n\nclass WDict(dict):\n    pass\n\nclass WList(list):\n    pass\n\n"
        "class Thing:\n    pass\n",
        module.__dict__,
    )
    return module


def test_results_whose_outcomes_hold_names_the_driver_cannot_import_fail_only_their_own_tasks() -> None:
    # Reviewers 27c and 27d: one such outcome failed the whole chunk (its dict or list subclass,
    # its exception group, or a class given as a value could not even be stood in for).
    module = _workers_only_module()
    sys.modules[module.__name__] = module
    try:
        values = [0, module.WDict(a=1), module.WList([1, 2]), module.Thing, {"deep": [module.Thing()]}, None, None, 7]
        errors = {
            5: error_info(ExceptionGroup("group", [module.Err("inside"), ValueError("plain")])),
            6: error_info(KeyError(module.WDict(b=2))),
        }
        payload = dumps_results(100, values, errors)
    finally:
        del sys.modules[module.__name__]
    with pytest.raises(ImportError):
        loads_results(payload)  # the strict load, as results by id ask for it
    base, got, failed = loads_results(payload, lenient=True)
    assert base == 100 and got[0] == 0 and got[7] == 7
    assert sorted(failed) == [1, 2, 3, 4, 5, 6]
    for i in (1, 2, 3, 4):
        exc = error_to_exception(failed[i])
        assert isinstance(exc, SerializationError) and "cannot be imported in this process" in str(exc), (i, exc)
    for i in (5, 6):
        exc = error_to_exception(failed[i])
        assert isinstance(exc, RemoteTaskError), (i, exc)
        assert any("cannot be rebuilt here" in note for note in exc.__notes__), exc.__notes__


def test_the_error_of_an_outcome_that_holds_a_missing_name_names_that_one_not_every_missing_name() -> None:
    module = _workers_only_module()
    sys.modules[module.__name__] = module
    try:
        payload = dumps_results(0, [module.Thing(), [module.WList()]], {})
    finally:
        del sys.modules[module.__name__]
    _, _, failed = loads_results(payload, lenient=True)
    assert f"{module.__name__}.Thing cannot be imported" in failed[0].message and "WList" not in failed[0].message
    assert f"{module.__name__}.WList cannot be imported" in failed[1].message and "Thing" not in failed[1].message


def test_a_module_given_as_a_value_that_this_process_lacks_costs_only_its_own_task() -> None:
    # Reviewer 28e: cloudpickle names a module by importing it, inside a function this process
    # has: the import failed the whole chunk's loading, its other tasks' outcomes with it.
    import sys
    import types

    module = types.ModuleType("zdq_test_gone_mod")
    sys.modules[module.__name__] = module
    try:
        payload = dumps_results(100, [module, 7], {}, KEY)
    finally:
        del sys.modules[module.__name__]
    base, values, errors = loads_results(payload, KEY, lenient=True)
    assert (base, values[1], list(errors)) == (100, 7, [0])
    assert isinstance(errors[0].exception, SerializationError)
    assert "module zdq_test_gone_mod cannot be imported in this process" in errors[0].message

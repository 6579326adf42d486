"""The consumer classes users write: made with daskqueue 0.2's arguments, or zdq's ``name=`` form,
whichever their ``__init__`` takes; and the error that says a class cannot be made."""

from __future__ import annotations

import pickle
import sys
import threading
import types
from typing import Any

import cloudpickle
import pytest

from zdq import ConsumerPool
from zdq.consumer.base import ConsumerArgs, ConsumerBaseClass, GeneralConsumer, make_consumer
from zdq.errors import ConsumerInitError, PlacementError, RemoteTaskError, ZdqError, arrived

ARGS = ConsumerArgs(id=2, name="C-1", pool="zdq-pool", batch_size=50, max_concurrency=3, retries=4, early_ack=True)
DASKQUEUE_ATTRIBUTES = {
    "id": 2,
    "name": "C-1",
    "pool": "zdq-pool",
    "batch_size": 50,
    "max_concurrency": 3,
    "n_retries": 4,
    "early_ack": True,
}


def attributes(consumer: ConsumerBaseClass) -> dict[str, Any]:
    return {key: getattr(consumer, key) for key in DASKQUEUE_ATTRIBUTES}


class UsesId(ConsumerBaseClass):
    def process_item(self, item: Any) -> Any:
        return f"[{self.id}] {item}"


class DaskqueueInit(ConsumerBaseClass):
    """daskqueue 0.2's signature, as its examples wrote subclasses."""

    def __init__(self, id, name, pool, batch_size, max_concurrency, retries, early_ack):  # type: ignore[no-untyped-def]
        super().__init__(id, name, pool, batch_size, max_concurrency, retries, early_ack)
        self.prefix = "x"

    def process_item(self, item: Any) -> Any:
        return self.prefix + str(item)


class RenamedPositionals(ConsumerBaseClass):
    """daskqueue passed its arguments positionally: a subclass could name them as it liked."""

    def __init__(self, number, label, queue_pool, batch, concurrency, n_retries, ack_early):  # type: ignore[no-untyped-def]
        super().__init__(number, label, queue_pool, batch, concurrency, n_retries, ack_early)

    def process_item(self, item: Any) -> Any:
        return item


class ByKeyword(ConsumerBaseClass):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)

    def process_item(self, item: Any) -> Any:
        return item


class ZdqNameFirst(ConsumerBaseClass):
    """zdq's own form (as in tests/test_placement.py): the name first, the rest by keyword."""

    def __init__(self, name: str = "", **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.given = name

    def process_item(self, item: Any) -> Any:
        return item


class ZdqNameOnly(ConsumerBaseClass):
    def __init__(self, name: str) -> None:
        super().__init__(name=name)

    def process_item(self, item: Any) -> Any:
        return item


class NoArguments(ConsumerBaseClass):
    def __init__(self) -> None:
        super().__init__(name="fixed")

    def process_item(self, item: Any) -> Any:
        return item


def test_a_class_without_its_own_init_gets_daskqueues_attributes_with_zdqs_meaning() -> None:
    consumer = make_consumer(UsesId, ARGS)
    assert attributes(consumer) == DASKQUEUE_ATTRIBUTES
    assert consumer.process_item("a") == "[2] a"
    assert attributes(make_consumer(GeneralConsumer, ARGS)) == DASKQUEUE_ATTRIBUTES


@pytest.mark.parametrize("cls", [DaskqueueInit, RenamedPositionals, ByKeyword], ids=lambda c: c.__name__)
def test_a_subclass_written_for_daskqueues_constructor_is_made_with_its_seven_arguments(cls: type[ConsumerBaseClass]) -> None:
    assert attributes(make_consumer(cls, ARGS)) == DASKQUEUE_ATTRIBUTES


def test_zdqs_own_subclasses_are_given_the_name_they_ask_for_and_the_rest_where_they_take_it() -> None:
    first = make_consumer(ZdqNameFirst, ARGS)
    assert isinstance(first, ZdqNameFirst) and first.given == "C-1"
    assert attributes(first) == DASKQUEUE_ATTRIBUTES  # its **kwargs carried the rest to the base
    only = make_consumer(ZdqNameOnly, ARGS)
    assert only.name == "C-1" and only.id is None and only.n_retries == 0
    assert make_consumer(NoArguments, ARGS).name == "fixed"


def test_the_base_takes_daskqueues_arguments_by_position_or_keyword_and_zdqs_name_alone() -> None:
    assert attributes(UsesId(2, "C-1", "zdq-pool", 50, 3, 4, True)) == DASKQUEUE_ATTRIBUTES
    keywords = {"id": 2, "name": "C-1", "pool": "zdq-pool", "batch_size": 50, "max_concurrency": 3, "retries": 4, "early_ack": True}
    assert attributes(UsesId(**keywords)) == DASKQUEUE_ATTRIBUTES
    assert attributes(UsesId(2, "C-1", pool="zdq-pool", batch_size=50, max_concurrency=3, retries=4, early_ack=True)) == (
        DASKQUEUE_ATTRIBUTES
    )
    alone = UsesId("upper-0")
    assert alone.name == "upper-0" and alone.id is None and alone.max_concurrency == 1 and alone.early_ack is False
    assert UsesId(name="upper-0", extra="ignored").name == "upper-0"
    with pytest.raises(TypeError, match="got 8 positional"):
        UsesId(2, "C-1", "zdq-pool", 50, 3, 4, True, "one too many")
    with pytest.raises(TypeError, match="multiple values for argument 'name'"):
        UsesId(2, "C-1", name="again")


def test_an_abstract_consumer_class_is_refused_before_anything_is_placed() -> None:
    class NoItems(ConsumerBaseClass):
        pass

    # Refused before the queue pool is even looked at: nothing reaches a cluster.
    with pytest.raises(ConsumerInitError, match="NoItems cannot be made: it does not define process_item") as info:
        ConsumerPool(None, object(), NoItems)  # type: ignore[arg-type]
    assert isinstance(info.value, PlacementError) and isinstance(info.value, ZdqError)


def test_a_number_in_the_consumer_class_place_is_refused_with_the_argument_it_likely_meant() -> None:
    with pytest.raises(TypeError, match=r"got 2 \(the third argument is the class, as in daskqueue: n_consumers=2\?\)"):
        ConsumerPool(None, object(), 2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"ConsumerClass must be a subclass of ConsumerBaseClass, got 'x'$"):
        ConsumerPool(None, object(), "x")  # type: ignore[arg-type]


class _Unpicklable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def _raised_from(cause: BaseException) -> ConsumerInitError:
    try:
        try:
            raise cause
        except Exception as e:
            raise ConsumerInitError("consumer class C raised it in __init__") from e
    except ConsumerInitError as error:
        return error


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_a_consumer_init_error_travels_with_its_cause_or_a_stand_in_that_says_what_it_was(dumps: Any) -> None:
    sent = pickle.loads(dumps(_raised_from(ConnectionError("database unreachable"))))
    assert type(sent) is ConsumerInitError and str(sent) == "consumer class C raised it in __init__"
    assert type(sent.__cause__) is ConnectionError and str(sent.__cause__) == "database unreachable"

    sent = pickle.loads(dumps(_raised_from(_Unpicklable("holds a lock"))))
    cause = sent.__cause__
    assert isinstance(cause, RemoteTaskError) and cause.type_name.endswith("_Unpicklable")
    assert "holds a lock" in str(cause) and "_raised_from" in cause.remote_traceback


class DBDown(Exception):
    """Pickles, but does not unpickle: its ``__init__`` wants two arguments, its ``args`` hold one."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(f"database at {host}:{port} is down")


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_a_consumer_init_error_whose_cause_pickles_but_does_not_unpickle_travels_with_its_cause_made_without_init(
    dumps: Any,
) -> None:
    sent = pickle.loads(dumps(_raised_from(DBDown("db.example", 5432))))
    assert type(sent) is ConsumerInitError and str(sent) == "consumer class C raised it in __init__"
    cause = sent.__cause__
    assert type(cause) is DBDown and str(cause) == "database at db.example:5432 is down", repr(cause)
    assert any("remote traceback" in note and "_raised_from" in note for note in getattr(cause, "__notes__", ()))


def test_a_consumer_made_with_its_class_reports_itself_unhealthy_once_its_start_fails() -> None:
    from zdq.config import settings
    from zdq.consumer import Consumer

    consumer = Consumer("C-0", b"c" * 16, UsesId, settings(), pool=("zdq-pool", None), number=1, batch_size=5)
    assert consumer.health() == (True, "not started")
    # A start that fails (here before any socket or thread: two endpoints for one queue) leaves a
    # live actor that never runs: the pool's supervisor replaces it only if health() says so.
    with pytest.raises(ValueError, match="2 endpoints for 1 queues"):
        consumer.start(["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"], [0])
    healthy, why = consumer.health()
    assert not healthy and "consumer C-0 on this process could not start: ValueError" in why, why


def test_the_consumer_actor_makes_its_class_at_once_and_names_it_when_its_init_raises() -> None:
    from zdq.config import settings
    from zdq.consumer import Consumer

    class Broken(ConsumerBaseClass):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            raise ConnectionError(f"database of {self.pool} unreachable")

        def process_item(self, item: Any) -> Any:
            return item

    with pytest.raises(ConsumerInitError) as info:
        Consumer("Broken-3", b"c" * 16, Broken, settings(), pool=("zdq-pool", None), number=4)
    message = str(info.value)
    assert message.startswith("consumer class ") and "Broken raised ConnectionError in __init__" in message, message
    assert "(consumer Broken-3 on this process): database of zdq-pool unreachable" in message, message
    # Its cause travels to the driver, which may not import the class (reviewer 27c): once there
    # (or given on in this process), it is the class's own exception again.
    assert type(arrived(info.value.__cause__)) is ConnectionError
    sent = pickle.loads(cloudpickle.dumps(info.value))
    assert type(sent) is ConsumerInitError and type(sent.__cause__) is ConnectionError, repr(sent.__cause__)


def test_a_consumer_init_error_whose_cause_the_driver_cannot_import_arrives_whole_through_dask() -> None:
    """Reviewer 27c: a class whose __init__ raised an exception of a module only the workers
    have came to ConsumerPool as raw pickle bytes (Dask's error_message has tblib pickle the
    cause by its class, which the driver could not import). It arrives as a ConsumerInitError
    caused by a RemoteTaskError naming the class and what is missing."""
    from distributed.core import clean_exception, error_message

    from zdq.config import settings
    from zdq.consumer import Consumer

    module = types.ModuleType("zdq_test_workers_only")
    exec("class Hidden(Exception):\n    def __init__(self, a, b):\n        super().__init__(a)\n", module.__dict__)
    sys.modules[module.__name__] = module
    try:

        class Refusing(ConsumerBaseClass):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                raise module.Hidden("hidden failure", 2)

            def process_item(self, item: Any) -> Any:
                return item

        with pytest.raises(ConsumerInitError) as info:
            Consumer("Refusing-0", b"c" * 16, Refusing, settings(), pool=("zdq-pool", None), number=1)
        sent = error_message(info.value)["exception"]  # what the worker sends
    finally:
        del sys.modules[module.__name__]  # the driver, here, cannot import it
    _, received, _ = clean_exception(getattr(sent, "data", sent))
    assert type(received) is ConsumerInitError, repr(received)
    cause = received.__cause__
    assert isinstance(cause, RemoteTaskError) and cause.type_name == "zdq_test_workers_only.Hidden", repr(cause)
    assert any("zdq_test_workers_only.Hidden cannot be imported in this process" in n for n in cause.__notes__)


def _refuse(code: int) -> Exception:
    raise RuntimeError(f"cannot rebuild the error of code {code}")


class _WontRebuild(Exception):
    """Pickles, and its unpickling raises (its ``__reduce__`` names a function that refuses)."""

    def __init__(self, *, code: int) -> None:
        super().__init__(f"code {code}")
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse, (self.code,))


def test_a_consumer_init_error_arrives_whole_through_dasks_error_message_when_its_cause_cannot_be_rebuilt() -> None:
    """Dask sends an actor's error through ``error_message``, which has tblib pickle the error's
    cause on its own, past ``ConsumerInitError.__reduce__``: a cause that did not unpickle turned
    the whole error into a bare ``Exception`` with its repr (reviewer 10). The consumer actor now
    raises it from the cause as a task's error travels: a RemoteTaskError naming it here."""
    from distributed.core import clean_exception, error_message

    from zdq.config import settings
    from zdq.consumer import Consumer

    class Refusing(ConsumerBaseClass):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            raise _WontRebuild(code=3)

        def process_item(self, item: Any) -> Any:
            return item

    with pytest.raises(ConsumerInitError) as info:
        Consumer("Refusing-0", b"c" * 16, Refusing, settings(), pool=("zdq-pool", None), number=1)
    sent = error_message(info.value)["exception"]  # what the worker sends: pickled bytes, wrapped
    _, received, _ = clean_exception(getattr(sent, "data", sent))
    assert type(received) is ConsumerInitError, repr(received)
    assert "Refusing raised _WontRebuild in __init__" in str(received)
    cause = received.__cause__
    assert isinstance(cause, RemoteTaskError) and cause.type_name.endswith("_WontRebuild"), repr(cause)
    assert "code 3" in str(cause) and any("remote traceback" in note for note in getattr(cause, "__notes__", ()))


def test_raw_items_are_listed_for_a_users_consumer_class_but_not_for_zdqs_own_general_consumer() -> None:
    from zdq.consumer.runner import _listing

    class Counting(ConsumerBaseClass):
        def process_item(self, item: object) -> int:
            return len(self.items)

    mine = Counting(name="counting-0")
    listing = _listing(mine)
    assert [listing(x) for x in "abc"] == [1, 2, 3] and mine.items == ["a", "b", "c"]
    general = GeneralConsumer(name="general-0")
    call = _listing(general)
    assert call((divmod, 7, 2)) == (3, 1) and general.items == []  # the default consumer keeps nothing

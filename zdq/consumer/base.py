"""The classes users subclass: a consumer's ``process_item`` handles raw items (the daskqueue API).

A consumer class is made on its worker when its consumer is placed (``ConsumerPool(...)``, as
daskqueue made its consumer actors), with daskqueue 0.2's seven arguments: see
:class:`ConsumerArgs` and :func:`make_consumer`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import pickle
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from dataclasses import astuple, dataclass
from typing import Any, overload

import cloudpickle

from zdq.consumer.daskqueue_loop import DaskqueueLoop

__all__ = ["ConsumerArgs", "ConsumerBaseClass", "DummyConsumer", "GeneralConsumer", "Message", "make_consumer", "save_hook"]

#: The logger a consumer's ``self._logger`` is (daskqueue's consumers had its package's).
consumer_logger = logging.getLogger("zdq.consumers")

#: daskqueue 0.2's ``ConsumerBaseClass.__init__`` arguments, in its order (its ConsumerPool passed
#: them positionally, so a subclass may have named them otherwise).
DASKQUEUE_ORDER = ("id", "name", "pool", "batch_size", "max_concurrency", "retries", "early_ack")


@dataclass(frozen=True)
class ConsumerArgs:
    """What a consumer class is made with: daskqueue 0.2's arguments, with zdq's meaning of each
    (see :class:`ConsumerBaseClass`). Its fields are in daskqueue's order."""

    id: int
    name: str
    pool: str
    batch_size: int | None
    max_concurrency: int
    retries: int
    early_ack: bool


class ConsumerBaseClass(DaskqueueLoop, ABC):
    """Base of user-defined consumers (the daskqueue API).

    Functions submitted with ``QueuePool.submit``/``batch_submit`` are called directly. Raw items
    sent with ``QueuePool.put``/``put_many`` are handed to :meth:`process_item`; what it returns is
    the item's result, what it raises is the item's error. As in daskqueue, the class is abstract:
    a subclass must define :meth:`process_item` to be instantiated.

    It takes daskqueue 0.2's arguments, positionally or by keyword, ``(id, name, pool, batch_size,
    max_concurrency, retries, early_ack)``, so a subclass written for daskqueue that calls
    ``super().__init__(id, name, pool, ...)`` runs unchanged; or zdq's shorter form, ``name``
    alone (``super().__init__(name)``, ``super().__init__(name=name, **kwargs)``). Other keywords
    are accepted and ignored. What a pool gives it, and how, is :func:`make_consumer`'s.

    Attributes
    ----------
    id : int or None
        The consumer's number in its ConsumerPool, from 1 (daskqueue's ``idx + 1``):
        ``Doubler-0`` is 1. A consumer placed again (its worker was lost) keeps it.
    name : str
        Its name, ``<class name>-<i>``: the keys of ``ConsumerPool.results()`` (daskqueue appended
        the worker's process id).
    pool : str or None
        The name of the QueuePool it consumes (daskqueue gave its queue pool actor, which zdq does
        not have): :func:`zdq.current_pool` in ``process_item`` attaches to it, to submit more.
    batch_size : int or None
        The ConsumerPool's ``batch_size`` (``None``: not given): in zdq it caps the chunks
        submitted, which are what a consumer takes at once.
    max_concurrency : int
        Threads of this consumer that run items.
    n_retries : int
        Retries of the items and tasks that carry no ``retries=`` of their own.
    early_ack : bool
        Whether a chunk is acknowledged on receipt (at most once) rather than after its results.
    items : list
        The raw items handed to :meth:`process_item` so far, as daskqueue kept them, in a class
        of the user's (a consumer that runs long and keeps none clears it: it grows with them;
        zdq's own :class:`GeneralConsumer` lists none). Submitted functions are called directly,
        not handed to :meth:`process_item`, and are not listed. With a hard time limit
        (``hard=True``) :meth:`process_item` runs in a child process: what it changes on the
        consumer, ``items`` too, stays there.

    daskqueue's other attributes are there too: ``_logger`` (the ``zdq.consumers`` logger),
    ``_worker`` and ``_executor`` (the Dask worker the consumer runs on and its executor;
    ``None`` outside a worker), ``future`` and ``_running_tasks``. So are its consume loop's
    methods, for a consumer placed as a Dask actor by hand with a :class:`zdq.QueuePoolActor` as
    its ``pool`` (``start()``, ``cancel()``, ``done()``, ``len_items()``...: see
    :mod:`zdq.consumer.daskqueue_loop`); zdq's :class:`~zdq.ConsumerPool` never calls them. A subclass that defines
    ``get_results()`` has :meth:`ConsumerPool.results <zdq.ConsumerPool.results>` return what
    each consumer's call of it returns, as daskqueue's did.

    >>> class Upper(ConsumerBaseClass):
    ...     def process_item(self, item):
    ...         return f"[{self.id}] {item.upper()}"
    >>> Upper(1, "Upper-0", "pool", None, 1, 0, False).process_item("a")
    '[1] A'
    >>> Upper(name="upper-0").name
    'upper-0'
    """

    @overload
    def __init__(self, name: str = "", **kwargs: Any) -> None: ...

    @overload
    def __init__(
        self,
        id: int,
        name: str,
        pool: Any,
        batch_size: int | None,
        max_concurrency: int,
        retries: int,
        early_ack: bool,
    ) -> None: ...

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # One positional argument is zdq's form (the name); more are daskqueue's, in its order.
        order = ("name",) if len(args) == 1 else DASKQUEUE_ORDER
        if len(args) > len(order):
            raise TypeError(
                f"{type(self).__name__}: ConsumerBaseClass takes daskqueue's {len(order)} arguments "
                f"{', '.join(order)}, got {len(args)} positional"
            )
        given = dict(zip(order, args))
        for key in given.keys() & kwargs.keys():
            raise TypeError(f"{type(self).__name__}: ConsumerBaseClass got multiple values for argument {key!r}")
        given.update(kwargs)
        self.id: int | None = given.get("id")
        self.name: str = given.get("name", "")
        self.pool: Any = given.get("pool")
        self.batch_size: int | None = given.get("batch_size")
        self.max_concurrency: int = given.get("max_concurrency", 1)
        self.n_retries: int = given.get("retries", 0)
        self.early_ack: bool = given.get("early_ack", False)
        # daskqueue's, for the subclasses written for it (see the class's attributes).
        self.items: list[Any] = []
        self.future: Any = None
        self._running_tasks: list[Any] = []
        self._logger = consumer_logger
        self._worker: Any = _current_worker()
        self._executor: Any = getattr(self._worker, "executor", None)

    def __getstate__(self) -> dict[str, Any]:
        # A consumer goes pickled to the child process of a task with a hard time limit: its
        # worker and executor do not pickle (nor are they the child's), and the items it was
        # handed are not sent each time.
        state = dict(self.__dict__)
        for name in ("_worker", "_executor", "fetch_loop", "_current_q", "_start_lock"):  # the last three: daskqueue's loop
            state[name] = None
        state["items"], state["_running_tasks"] = [], []
        return state

    @abstractmethod
    def process_item(self, item: Any) -> Any:
        """Handle one raw item; its return value is the item's result."""


def _current_worker() -> Any:
    """The Dask worker this code runs on, or ``None`` (a consumer made outside one: a test's)."""
    try:
        from distributed import get_worker

        return get_worker()
    except ValueError:
        return None


class DummyConsumer(ConsumerBaseClass):
    """daskqueue's consumer for trying a pool out: logs each raw item it is handed (at INFO, on
    the ``zdq.consumers`` logger) and returns ``None``.

    >>> DummyConsumer(name="dummy-0").process_item(42) is None
    True
    """

    def process_item(self, item: Any) -> None:
        self._logger.info("[%s]: Processing %s", self.name, item)


_NO_KEY: Any = object()  # Message() given no key: daskqueue's func= may follow


class Message:
    """A task as :meth:`GeneralConsumer.save` gets it: ``Message(key)``, its ``key`` (the task id,
    the key of its result in ``ConsumerPool.results()`` and of its future; ``id`` too).

    Or daskqueue's message, ``Message(fn, *args, **kwargs)`` (``func=fn`` too): a call to make
    later, as ``data`` (``msg.data()`` makes it), with a new UUID as its ``id``, its ``timestamp``
    (whole seconds) and :meth:`serialize`. Put in a queue (``queue_pool.put(msg)``), a
    :class:`GeneralConsumer` runs it, hands the result to its ``save(msg, result)`` and returns it.

    >>> Message(7).id, Message(divmod, 7, 2).data()
    (7, (3, 1))
    """

    def __init__(self, key: Any = _NO_KEY, /, *args: Any, **kwargs: Any) -> None:
        if key is _NO_KEY and callable(kwargs.get("func")):  # daskqueue's Message(func=fn, ...)
            key = kwargs.pop("func")
        if callable(key):  # daskqueue's Message(func, *args, **kwargs)
            self.id: Any = uuid.uuid4()
            self.key: Any = self.id
            self.data: Callable[[], Any] | None = functools.partial(key, *args, **kwargs)
            self.timestamp: int | None = int(time.time())
        elif isinstance(key, int) and not isinstance(key, bool) and not args and not kwargs:
            self.key = self.id = key
            self.data = self.timestamp = None
        else:
            shown = "nothing" if key is _NO_KEY else repr(key)
            raise TypeError(f"Message takes a task id (an int) or a function and its arguments, got {shown}")
        self.delivered_timestamp: float | None = None

    def __repr__(self) -> str:
        return f"Message({self.key!r})" if self.data is None else f"Message({self.id}: {self.data!r})"

    def __str__(self) -> str:
        return f"Message {self.id.int}" if self.data is not None else repr(self)  # daskqueue's, for its form

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Message) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def serialize(self) -> bytes:
        """The message pickled (with cloudpickle when its call is a lambda or a local function)."""
        try:
            return pickle.dumps(self)
        except (pickle.PicklingError, AttributeError, TypeError):
            return cloudpickle.dumps(self)


class GeneralConsumer(ConsumerBaseClass):
    """The default consumer: runs submitted functions; a raw item ``(fn, *args)`` or
    ``Message(fn, *args)`` is called too.

    daskqueue's hook for results is kept: a subclass that overrides :meth:`save` has it called
    on the consumer with each submitted function's result, ``save(msg, result)`` (``msg`` a
    :class:`Message`), after the task's chunk ran and before its results are sent (what ``save``
    raises fails that task, without a retry: the task itself succeeded). Its results still reach
    the driver as any task's. A ``backend`` (an 8th
    argument, as daskqueue's) is given each result by the default :meth:`save`.

    >>> GeneralConsumer(name="general-0").process_item((divmod, 7, 2))
    (3, 1)
    """

    def __init__(self, *args: Any, backend: Any = None, **kwargs: Any) -> None:
        if len(args) == len(DASKQUEUE_ORDER) + 1:  # daskqueue's (id, ..., early_ack, backend)
            *args_, backend = args
            args = tuple(args_)
        self.backend = backend
        self._results: dict[int, Any] = {}
        super().__init__(*args, **kwargs)

    def save(self, msg: Message, result: Any) -> None:
        """Called with each submitted function's result when a subclass overrides it (daskqueue's
        hook, to send results elsewhere); the default gives it to ``backend``, if any. Placed by
        hand (daskqueue's consume loop), it also keeps it for :meth:`get_results`, as daskqueue's did."""
        if self.fetch_loop is not None:
            self.__dict__.setdefault("_results", {})[hash(msg)] = result
        if self.backend is not None:
            self.backend.save(result)

    async def _saved_when_done(self, msg: Message, call: Coroutine[Any, Any, Any]) -> Any:
        result = await call
        self.save(msg, result)
        return result

    def get_results(self) -> dict[int, Any]:
        """daskqueue's: the results :meth:`save` kept, by ``hash(msg)``, of the messages this
        consumer ran when placed as an actor by hand. zdq's :class:`~zdq.ConsumerPool` keeps
        results itself (``ConsumerPool.results()``): none are kept here for it."""
        return dict(self.__dict__.get("_results", {}))

    def process_item(self, item: Any) -> Any:
        if isinstance(item, tuple) and item and callable(item[0]):
            return item[0](*item[1:])
        if isinstance(item, Message) and item.data is not None:  # daskqueue's Message(fn, *args)
            result = item.data()
            if self.fetch_loop is not None and inspect.iscoroutine(result):
                return self._saved_when_done(item, result)  # daskqueue's loop awaits it, on the event loop
            self.save(item, result)  # as daskqueue's GeneralConsumer did (what save raises fails the item)
            return result
        raise TypeError(
            "GeneralConsumer runs functions: put() a tuple (fn, *args) or a Message(fn, *args), use submit(), "
            "or give ConsumerPool a ConsumerClass whose process_item() handles this item"
        )


def make_consumer(cls: type[ConsumerBaseClass], args: ConsumerArgs) -> ConsumerBaseClass:
    """Make ``cls`` with ``args`` the way its ``__init__`` takes them.

    As daskqueue's ConsumerPool did, the seven arguments positionally, in daskqueue's order, when
    its ``__init__`` takes seven positional arguments (``ConsumerBaseClass``'s own, a daskqueue
    subclass's, ``*args, **kwargs``). Else zdq's form, by keyword: all of them to an ``__init__``
    that takes ``**kwargs``, those it names to one that does not (``name=`` at least, when it takes
    a name); also when its first argument is ``name`` (zdq's ``(self, name="", *args)``).
    """
    values = astuple(args)
    make: Callable[..., ConsumerBaseClass] = cls  # a concrete subclass (the pool checked)
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # no signature to read (a class made in C): daskqueue's form
        return make(*values)
    params = list(signature.parameters.values())
    first_is_name = bool(params) and params[0].name == "name" and params[0].kind is not params[0].VAR_POSITIONAL
    if not first_is_name:
        try:
            signature.bind(*values)
        except TypeError:
            pass
        else:
            return make(*values)
    keywords = dict(zip(DASKQUEUE_ORDER, values))
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        keywords = {key: value for key, value in keywords.items() if key in named}
    return make(**keywords)


def save_hook(handler: Any) -> Callable[[Message, Any], None] | None:
    """``handler.save`` when it is a :class:`GeneralConsumer` whose class overrides :meth:`save
    <GeneralConsumer.save>` or was given a backend (daskqueue's hook: the runner calls it with
    each function's result), else ``None``: nothing to call, nothing to pay per task."""
    if not isinstance(handler, GeneralConsumer):
        return None
    # getattr: a subclass's __init__ may not have called GeneralConsumer's (no backend then).
    if type(handler).save is GeneralConsumer.save and getattr(handler, "backend", None) is None:
        return None
    return handler.save

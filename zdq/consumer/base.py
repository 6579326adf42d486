"""The classes users subclass: a consumer's ``process_item`` handles raw items (the daskqueue API)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

__all__ = ["ConsumerBaseClass", "GeneralConsumer"]


class ConsumerBaseClass(ABC):
    """Base of user-defined consumers (the daskqueue API).

    Functions submitted with ``QueuePool.submit``/``batch_submit`` are called directly. Raw items
    sent with ``QueuePool.put``/``put_many`` are handed to :meth:`process_item`; what it returns is
    the item's result, what it raises is the item's error. As in daskqueue, the class is abstract:
    a subclass must define :meth:`process_item` to be instantiated.

    >>> class Upper(ConsumerBaseClass):
    ...     def process_item(self, item):
    ...         return item.upper()
    >>> Upper(name="upper-0").process_item("a")
    'A'
    """

    def __init__(self, name: str = "", **kwargs: Any) -> None:
        self.name = name

    @abstractmethod
    def process_item(self, item: Any) -> Any:
        """Handle one raw item; its return value is the item's result."""


class GeneralConsumer(ConsumerBaseClass):
    """The default consumer: runs submitted functions; a raw item ``(fn, *args)`` is called too.

    >>> GeneralConsumer(name="general-0").process_item((divmod, 7, 2))
    (3, 1)
    """

    def process_item(self, item: Any) -> Any:
        if isinstance(item, tuple) and item and callable(item[0]):
            return item[0](*item[1:])
        raise TypeError(
            "GeneralConsumer runs functions: put() a tuple (fn, *args), use submit(), "
            "or give ConsumerPool a ConsumerClass whose process_item() handles this item"
        )

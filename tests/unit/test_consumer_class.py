"""The consumer classes users write: made with daskqueue 0.2's arguments, or zdq's ``name=`` form,
whichever their ``__init__`` takes."""

from __future__ import annotations

from typing import Any

import pytest

from zdq.consumer.base import ConsumerArgs, ConsumerBaseClass, GeneralConsumer, make_consumer

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

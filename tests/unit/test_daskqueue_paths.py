"""daskqueue 0.2.0's module paths and top-level names, with the package renamed: its own tests
and programs import ``from daskqueue.QueuePool import QueuePool``, ``from daskqueue.Consumer
import DummyConsumer``, ``from daskqueue.queue.base_queue import Durability``; with ``zdq`` in
its place each of those failed with ``ModuleNotFoundError`` (and ``DummyConsumer``,
``PutTimeout`` and ``Message`` with ``ImportError``), though zdq has every one of those names."""

from __future__ import annotations

import importlib
import logging
import queue

import pytest

import zdq
from zdq.daskqueue_paths import MODULES

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("path", sorted(MODULES))
def test_each_of_daskqueues_module_paths_imports_with_its_names(path: str) -> None:
    module = importlib.import_module(f"zdq.{path}")
    for name, value in MODULES[path].items():
        # The stdlib's queue.Empty and queue.Full, which daskqueue's transient_queue re-exported,
        # are no names of the package (nor of daskqueue's).
        assert getattr(module, name) is value is (value if value in (queue.Empty, queue.Full) else getattr(zdq, name))
    assert sorted(module.__all__) == sorted(MODULES[path])


def test_importing_them_leaves_the_package_names_the_classes() -> None:
    from zdq.ConsumerPool import ConsumerPool
    from zdq.QueuePool import PutTimeout, QueuePool

    importlib.import_module("zdq.QueuePool")
    assert zdq.QueuePool is QueuePool and isinstance(QueuePool, type)
    assert zdq.ConsumerPool is ConsumerPool and isinstance(ConsumerPool, type)
    assert PutTimeout is zdq.SubmitTimeout  # `except PutTimeout` catches what zdq raises


def test_a_daskqueue_internal_is_a_missing_name_of_a_module_that_exists() -> None:
    with pytest.raises(ImportError, match="DurableQueue"):  # daskqueue's QueuePool module imported it
        exec("from zdq.QueuePool import DurableQueue", {})
    with pytest.raises(ImportError, match="zdq.queue.durable_queue"):  # its files and segments: no counterpart
        exec("from zdq.queue.durable_queue import DurableQueue", {})


def test_the_dummy_consumer_logs_each_item_and_returns_nothing(caplog: pytest.LogCaptureFixture) -> None:
    from zdq.Consumer import DummyConsumer

    consumer = DummyConsumer(1, "DummyConsumer-0", "pool", 10, 1, 0, False)  # daskqueue's arguments
    with caplog.at_level(logging.INFO, logger="zdq.consumers"):
        assert consumer.process_item({"a": 1}) is None
    assert "[DummyConsumer-0]: Processing {'a': 1}" in caplog.text

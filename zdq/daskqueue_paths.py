"""daskqueue 0.2.0's module paths, for programs that import from them with the package renamed.

daskqueue's classes live in modules named after them (``daskqueue/QueuePool.py``,
``daskqueue/Consumer.py``, ``daskqueue/queue/base_queue.py``...), which its own tests and some
programs import from: ``from daskqueue.QueuePool import QueuePool`` becomes
``from zdq.QueuePool import QueuePool``. Each such module is registered here under zdq's name,
holding the names of it that zdq has: daskqueue's in-memory ``TransientQueue`` works as it did
(``zdq/daskqueue_queues.py``), and so does its ``QueuePoolActor`` of such queues, with consumers
placed as actors by hand; its durable queue's files and log segments have no counterpart (importing
one fails as a missing name or module). The modules are entries of ``sys.modules`` alone: importing one
finds it there and never sets it on the package, whose ``zdq.QueuePool`` and
``zdq.ConsumerPool`` stay the classes, as ``daskqueue.QueuePool`` was after its ``__init__``.

>>> from zdq.queue.base_queue import Durability
>>> Durability.DURABLE.value
'durable'
"""

from __future__ import annotations

import sys
import types
from typing import Any

from zdq.client.consumer_pool import ConsumerPool
from zdq.client.queue_pool import Durability, QueuePool
from zdq.consumer.base import ConsumerBaseClass, DummyConsumer, GeneralConsumer, Message
from zdq.daskqueue_queues import Empty, Full, QueuePoolActor, TransientQueue
from zdq.errors import PutTimeout

__all__ = ["MODULES"]

#: daskqueue's module -> the names of it that zdq has, by the name daskqueue gave them.
MODULES: dict[str, dict[str, Any]] = {
    "QueuePool": {
        "QueuePool": QueuePool,
        "QueuePoolActor": QueuePoolActor,
        "PutTimeout": PutTimeout,
        "Durability": Durability,
        "ConsumerBaseClass": ConsumerBaseClass,
        "GeneralConsumer": GeneralConsumer,
        "Message": Message,
    },
    "ConsumerPool": {"ConsumerPool": ConsumerPool, "ConsumerBaseClass": ConsumerBaseClass, "GeneralConsumer": GeneralConsumer},
    "Consumer": {"ConsumerBaseClass": ConsumerBaseClass, "DummyConsumer": DummyConsumer, "GeneralConsumer": GeneralConsumer},
    "Protocol": {"Message": Message},
    "queue": {"Durability": Durability, "TransientQueue": TransientQueue},
    "queue.base_queue": {"Durability": Durability},
    "queue.transient_queue": {"TransientQueue": TransientQueue, "Durability": Durability, "Empty": Empty, "Full": Full, "Message": Message},
}


def _register() -> None:
    for path, names in MODULES.items():
        name = f"{__package__}.{path}"
        if name in sys.modules:
            continue
        module = types.ModuleType(name, f"daskqueue's ``daskqueue.{path}``, as far as zdq has it: {', '.join(names)}.")
        module.__dict__.update(names, __all__=list(names))
        if path == "queue":
            module.__dict__["__path__"] = []  # a package: queue.base_queue is below it
        sys.modules[name] = module


_register()

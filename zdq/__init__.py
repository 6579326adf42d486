"""zdq: a task queue on Dask where tasks travel over ZeroMQ, not through the scheduler.

>>> from zdq import QueuePool, ConsumerPool, Durability   # the daskqueue API
"""

from zdq.config import PoolSettings, settings
from zdq.consumer import ConsumerBaseClass, DummyConsumer, GeneralConsumer, Message
from zdq.client.consumer_pool import ConsumerPool
from zdq.errors import (
    AddressError,
    BatchError,
    BrokerLost,
    BrokerUnreachable,
    ClosedError,
    ConsumerInitError,
    DeadLettered,
    PlacementError,
    ProtocolError,
    QueueLocked,
    RemoteTaskError,
    SerializationError,
    UnreadableResult,
    StorageCorrupt,
    StorageError,
    StorageFull,
    SubmitTimeout,
    PutTimeout,
    TaskExpired,
    TaskLost,
    DuplicateTask,
    NoConsumers,
    NoEligibleWorkers,
    QueueMissing,
    TaskCancelled,
    TaskProcessDied,
    TaskTimeout,
    WrongConsumerClass,
    ZdqError,
    ZdqTimeoutError,
)
from zdq.codec.tasks import TaskOptions
from zdq.objects import Task
from zdq.client.local import Executor, local
from zdq.client.executor import PoolExecutor
from zdq.client.gather import gather
from zdq.client.schedules import Schedule
from zdq.futures import BatchFuture, TaskFuture, as_completed, wait
from zdq.client.queue_pool import DeadLetterInfo, Durability, QueuePool, current_pool
from zdq.client.by_id import PoolNotFound, result, state
from zdq.daskqueue_queues import QueuePoolActor, TransientQueue

# The client modules moved to zdq.client; their old paths re-export them for one release, and
# zdq.embedded stays an attribute of the package, as it was when local() was imported from it.
from zdq import embedded  # noqa: E402,F401
from zdq import daskqueue_paths  # noqa: E402,F401 - daskqueue's module paths, made importable

__version__ = "0.1.0"

__all__ = [
    # pools (the daskqueue API)
    "QueuePool",
    "ConsumerPool",
    "Durability",
    "DeadLetterInfo",
    "current_pool",
    "local",
    "Executor",
    "PoolExecutor",
    "gather",
    "Schedule",
    "TaskOptions",
    "Task",
    "ConsumerBaseClass",
    "GeneralConsumer",
    "DummyConsumer",
    "Message",
    "TransientQueue",
    "QueuePoolActor",  # daskqueue's pool of TransientQueue actors, for consumers placed by hand
    # futures
    "TaskFuture",
    "BatchFuture",
    "wait",
    "as_completed",
    # results by id, from any process
    "result",
    "state",
    "PoolNotFound",
    # configuration
    "PoolSettings",
    "settings",
    # errors
    "ZdqError",
    "ClosedError",
    "SerializationError",
    "UnreadableResult",
    "ProtocolError",
    "PlacementError",
    "ConsumerInitError",
    "AddressError",
    "BrokerLost",
    "BrokerUnreachable",
    "StorageError",
    "StorageFull",
    "StorageCorrupt",
    "QueueLocked",
    "QueueMissing",
    "ZdqTimeoutError",
    "SubmitTimeout",
    "PutTimeout",
    "TaskTimeout",
    "TaskProcessDied",
    "RemoteTaskError",
    "DeadLettered",
    "TaskExpired",
    "TaskCancelled",
    "TaskLost",
    "DuplicateTask",
    "NoConsumers",
    "NoEligibleWorkers",
    "WrongConsumerClass",
    "BatchError",
]

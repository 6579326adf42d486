"""zdq: a task queue on Dask where tasks travel over ZeroMQ, not through the scheduler.

>>> from zdq import QueuePool, ConsumerPool, Durability   # the daskqueue API
"""

from zdq.config import PoolSettings, settings
from zdq.consumer import ConsumerBaseClass, GeneralConsumer
from zdq.consumer_pool import ConsumerPool
from zdq.errors import (
    AddressError,
    BatchError,
    BrokerLost,
    BrokerUnreachable,
    ClosedError,
    DeadLettered,
    PlacementError,
    ProtocolError,
    QueueLocked,
    RemoteTaskError,
    SerializationError,
    StorageCorrupt,
    StorageError,
    StorageFull,
    SubmitTimeout,
    TaskLost,
    TaskTimeout,
    ZdqError,
    ZdqTimeoutError,
)
from zdq.tasks import TaskOptions
from zdq.objects import Task
from zdq.embedded import local
from zdq.scheduling import Schedule
from zdq.futures import BatchFuture, TaskFuture, as_completed, wait
from zdq.queue_pool import DeadLetterInfo, Durability, QueuePool, current_pool

__version__ = "0.1.0"

__all__ = [
    # pools (the daskqueue API)
    "QueuePool",
    "ConsumerPool",
    "Durability",
    "DeadLetterInfo",
    "current_pool",
    "local",
    "Schedule",
    "TaskOptions",
    "Task",
    "ConsumerBaseClass",
    "GeneralConsumer",
    # futures
    "TaskFuture",
    "BatchFuture",
    "wait",
    "as_completed",
    # configuration
    "PoolSettings",
    "settings",
    # errors
    "ZdqError",
    "ClosedError",
    "SerializationError",
    "ProtocolError",
    "PlacementError",
    "AddressError",
    "BrokerLost",
    "BrokerUnreachable",
    "StorageError",
    "StorageFull",
    "StorageCorrupt",
    "QueueLocked",
    "ZdqTimeoutError",
    "SubmitTimeout",
    "TaskTimeout",
    "RemoteTaskError",
    "DeadLettered",
    "TaskLost",
    "BatchError",
]

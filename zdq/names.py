"""The names people see: of queues, drivers and consumers, each made by one function here.

A queue is ``<pool name>-queue-<i>`` everywhere it is shown: the repr of its pool and of
``queue_pool[i]``, the keys of ``get_queue_size()``, ``BrokerStats.name``, log lines, errors, and
``zdq inspect`` (a durable queue's directory is ``<dirpath>/<queue name>``, so the command that
reads the disk shows the same name). Peers on the wire are known by 16 random bytes; they announce
these names in their HELLO, and the broker shows the names, never the bytes.

A pool's name is the user's, checked where it is given (:func:`check_pool_name`: ``QueuePool``,
``QueuePool.attach``, ``zdq.result``/``zdq.state``, the ``zdq`` command's POOL), so that every name
made of it above stays a file name inside ``dirpath`` and within what monitoring reports keep.
"""

from __future__ import annotations

import collections
import os
import re
import socket
import threading
from collections.abc import Iterable

from zdq.codec.names import check_name

__all__ = [
    "POOL_NAME_MAX", "agreeing", "check_pool_name", "consumer_names", "counted", "driver_name", "queue_name", "queue_name_of",
    "sorted_by_name", "unnamed_peer",
]

#: The longest pool name, in bytes of UTF-8. The names made of it stay within every limit: its
#: queues' (``<name>-queue-<i>``) within a file name (255 bytes: a durable queue's directory is
#: named after its queue) and a monitoring report's strings (256 characters: a longer one is
#: dropped, and the pool is missing from ``zdq status``), its drivers' (``<name>-driver@<host>:
#: <pid>``, hosts of up to 64 bytes) within a HELLO's 256 bytes.
POOL_NAME_MAX = 128

_drivers_lock = threading.Lock()
_drivers: collections.Counter[str] = collections.Counter()


def check_pool_name(name: object, argument: str = "name") -> str:
    """``name`` if it can name a pool; else raise naming ``argument`` and the rule it breaks.

    A pool's name follows the rules of every name (:func:`zdq.codec.names.check_name`: a non-empty
    ``str`` of printable characters, without surrounding spaces, not starting with ``-``) in at
    most :data:`POOL_NAME_MAX` bytes of UTF-8, and is one file name: no ``/`` or ``\\``, not
    starting with ``.`` (``..``, a hidden directory), so that a durable queue's directory,
    ``<dirpath>/<name>-queue-<i>``, is a directory of ``dirpath`` that ``zdq inspect`` lists.

    >>> check_pool_name("nightly-jobs")
    'nightly-jobs'
    """
    what = f"{argument}: a pool's name"
    checked = check_name(name, what, POOL_NAME_MAX, in_bytes=True)
    if "/" in checked or "\\" in checked:
        raise ValueError(
            f"{what} must not hold '/' or '\\' (a durable queue's directory, <dirpath>/<name>-queue-<i>, "
            f"would not be a directory of dirpath), got {checked!r:.80}"
        )
    if checked.startswith("."):
        raise ValueError(f"{what} must not start with '.' (its queues' directories would be hidden, or '..'), got {checked!r:.80}")
    return checked


def queue_name(pool: str, index: int) -> str:
    """Queue ``index`` of pool ``pool``.

    >>> queue_name("default", 1)
    'default-queue-1'
    """
    return f"{pool}-queue-{index}"


def pool_of_queue(queue: str) -> str:
    """The pool of queue ``queue`` (the inverse of :func:`queue_name`).

    >>> pool_of_queue("default-queue-1")
    'default'
    """
    pool, sep, index = queue.rpartition("-queue-")
    return pool if sep and index.isdigit() else queue


def queue_name_of(path: str) -> str:
    """The name of the durable queue in directory ``path``: a pool keeps queue ``name`` in
    ``<dirpath>/<name>``, so tools that read the disk (``zdq inspect``) show the pool's names.

    >>> queue_name_of("/data/queues/default-queue-1/")
    'default-queue-1'
    """
    return os.path.basename(os.path.normpath(path))


def sorted_by_name(names: Iterable[str]) -> list[str]:
    """Names in the order people count: ``queue-2`` before ``queue-10``."""
    return sorted(names, key=lambda name: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)])


def driver_name(pool: str) -> str:
    """A name for a new driver (the data plane of a QueuePool, owner or attached) of ``pool``.

    ``<pool>-driver@<host>:<pid>``: several processes may feed one pool, and a broker's statistics
    say which of them got which results. A second driver of the same pool in one process gets
    ``#2``, and so on, so that a name stands for one driver.
    """
    base = f"{pool}-driver@{socket.gethostname()}:{os.getpid()}"
    with _drivers_lock:
        _drivers[base] += 1
        n = _drivers[base]
    return base if n == 1 else f"{base}#{n}"


def consumer_names(class_name: str, n: int) -> list[str]:
    """daskqueue's names for the ``n`` consumers of a ConsumerPool: ``<class>-<i>``, the keys of
    its ``results()``. They are the pool's, as in daskqueue: two live ConsumerPools of one class
    on one queue pool both have a ``<class>-0``, and a broker's statistics list both.

    >>> consumer_names("GeneralConsumer", 2)
    ['GeneralConsumer-0', 'GeneralConsumer-1']
    """
    return [f"{class_name}-{i}" for i in range(n)]


def unnamed_peer(identity: bytes) -> str:
    """How a peer whose HELLO did not arrive is shown (zdq's peers say HELLO first, on every
    connection: in practice, a peer that is not zdq's)."""
    return f"unnamed peer {identity[:4].hex()}"


def counted(n: int, noun: str) -> str:
    """``1 queue``, ``2 queues``: for reprs people read."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def agreeing(n: int, one: str = "was", many: str = "were") -> str:
    """The verb that agrees with a count of ``n`` (``1 task was``, ``2 tasks were``), for the
    messages :func:`counted` begins."""
    return one if n == 1 else many

"""Live pools, known by name on the cluster: how a second producer attaches to a pool.

A pool's owner (the QueuePool that placed its brokers) publishes a :class:`PoolRecord` on the Dask
scheduler under a key made from its name (and directory, for durable queues), updates it when a
queue is placed again, and withdraws it when it closes. Another QueuePool, in any process of the
cluster (a task of the pool itself included), finds it there and attaches: it gets the endpoints
and the keys over Dask's own channel, as consumers do when they are placed, and submits to the
same queues; each driver gets its own results.

Ownership: no state in this process; the records live on the scheduler (Dask's published
datasets), written by their owner (and withdrawn by whoever finds one stale).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from zdq.config import PoolSettings
from zdq.transport.security import ClientKeys

__all__ = ["PoolRecord", "registry_key", "publish", "lookup", "withdraw"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolRecord:
    """What a producer needs to feed a live pool."""

    name: str
    durable: bool
    dirpath: str | None
    queue_names: tuple[str, ...]
    endpoints: tuple[str, ...]
    client_keys: ClientKeys | None
    payload_key: bytes | None
    settings: PoolSettings
    owner_client: str  # the Dask client id of the owner: gone with it, the record is stale
    # A random token of the owner, to tell its record from a later owner's: never its driver's
    # ZeroMQ identity, which a peer could take over its connections with.
    owner_token: bytes
    workers: tuple[str, ...] = ()  # the worker of each queue, for errors


def registry_key(name: str, dirpath: str | None) -> str:
    return f"zdq-pool:{name}" if dirpath is None else f"zdq-pool:{name}@{dirpath}"


def _client_connected(client_id: str, dask_scheduler: Any = None) -> bool:
    return client_id in dask_scheduler.clients


def publish(client: Any, record: PoolRecord) -> None:
    key = registry_key(record.name, record.dirpath)
    try:
        client.unpublish_dataset(key)
    except KeyError:
        pass
    client.publish_dataset(**{key: record})


def lookup(client: Any, name: str, dirpath: str | None) -> PoolRecord | None:
    """The live pool published under ``name`` (and ``dirpath``), or None. A record whose owner's
    client has left the cluster is stale: it is withdrawn and None returned."""
    key = registry_key(name, dirpath)
    record = client.get_dataset(key, default=None)
    if not isinstance(record, PoolRecord):
        return None
    try:
        alive = bool(client.run_on_scheduler(_client_connected, record.owner_client))
    except Exception as e:  # cannot tell: take it as alive, the caller's timeouts bound the rest
        logger.debug("could not check the owner of pool %s: %s", name, e)
        alive = True
    if not alive:
        withdraw(client, record)
        return None
    return record


def withdraw(client: Any, record: PoolRecord) -> None:
    try:
        current = client.get_dataset(registry_key(record.name, record.dirpath), default=None)
        if isinstance(current, PoolRecord) and current.owner_token == record.owner_token:
            client.unpublish_dataset(registry_key(record.name, record.dirpath))
    except Exception as e:  # the scheduler may be going away with the cluster
        logger.debug("could not withdraw pool %s: %s", record.name, e)

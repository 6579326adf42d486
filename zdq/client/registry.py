"""Live pools, known by name on the cluster: how a second producer attaches to a pool.

A pool's owner (the QueuePool that placed its brokers) publishes a :class:`PoolRecord` on the Dask
scheduler under a key made from its name (and directory, for durable queues), updates it when a
queue is placed again, and withdraws it when it closes. Another QueuePool, in any process of the
cluster (a task of the pool itself included), finds it there and attaches: it gets the endpoints
and the keys over Dask's own channel, as consumers do when they are placed, and submits to the
same queues; each driver gets its own results.

A record outlives its owner a moment: the scheduler sees a killed owner's client leave only once
the kernel has closed its sockets, which it does after freeing the process's memory (~0.1 s for a
1.5 GB process). A program restarted at once would attach to queues that are about to shut down.
So the record also names its owner's process (:class:`OwnerProcess`), and :func:`owner_state`
tells, on the owner's host, whether that process is dead or dying; elsewhere it cannot tell, and
the attaching pool looks again after :data:`OWNER_SETTLE`.

Ownership: no state in this process; the records live on the scheduler (Dask's published
datasets), written by their owner (and withdrawn by whoever finds one stale).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from collections.abc import Container, Iterable
from typing import Any

from zdq._actor import scheduler_call
from zdq.config import PoolSettings
from zdq.errors import ClosedError, PlacementError
from zdq.transport.security import ClientKeys

__all__ = [
    "OwnerProcess",
    "PoolRecord",
    "registry_key",
    "publish",
    "lookup",
    "live_record",
    "not_found",
    "published_as",
    "withdraw",
    "owner_state",
]

logger = logging.getLogger(__name__)

#: A record whose owner's liveness this process cannot see (another host) is looked up again
#: after this (s) before attaching: long enough for a killed owner's sockets to close and the
#: scheduler to drop its client (then the record is withdrawn as stale).
OWNER_SETTLE = 0.5

_PF_EXITING = 0x4  # the kernel's flag of a process that is exiting (/proc/PID/stat field 9)
_SIGKILL_BIT = 1 << 8  # SIGKILL (9) in the pending-signal masks of /proc/PID/status


@dataclass(frozen=True)
class OwnerProcess:
    """The process of a pool's owner: its host (boot id and pid namespace, so that two
    containers of one machine differ), its pid, and its start time (so that a reused pid
    differs). Empty fields where the platform has no /proc."""

    host: str = ""
    pid: int = 0
    started: str = ""

    @classmethod
    def here(cls) -> OwnerProcess:
        host = _host_id()
        stat = _read(f"/proc/{os.getpid()}/stat")
        started = _stat_fields(stat)[19] if host and stat else ""
        return cls(host, os.getpid(), started) if started else cls()


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
    owner_process: OwnerProcess = field(default_factory=OwnerProcess)


def registry_key(name: str, dirpath: str | None) -> str:
    return f"zdq-pool:{name}" if dirpath is None else f"zdq-pool:{name}@{dirpath}"


def _client_connected(client_id: str, dask_scheduler: Any = None) -> bool:
    return client_id in dask_scheduler.clients


def publish(client: Any, record: PoolRecord) -> None:
    """Publish ``record``, replacing the pool's earlier one in one step: a producer attaching or a
    process asking for a result by id meanwhile finds one or the other, never none."""
    scheduler_call(
        client, f"the record of pool {record.name}", client.publish_dataset,
        **{registry_key(record.name, record.dirpath): record}, override=True,
    )


def lookup(client: Any, name: str, dirpath: str | None) -> PoolRecord | None:
    """The live pool published under ``name`` (and ``dirpath``), or None. A record whose owner's
    client has left the cluster is stale: it is withdrawn and None returned."""
    key = registry_key(name, dirpath)
    record = scheduler_call(client, f"the lookup of pool {name}", client.get_dataset, key, default=None)
    if not isinstance(record, PoolRecord):
        return None
    try:
        asked = f"whether pool {name}'s owner is connected"
        alive = bool(scheduler_call(client, asked, client.run_on_scheduler, _client_connected, record.owner_client))
    except PlacementError:
        raise
    except Exception as e:  # cannot tell: take it as alive, the caller's timeouts bound the rest
        logger.debug("could not check the owner of pool %s: %s", name, e)
        alive = True
    if not alive:
        withdraw(client, record)
        return None
    return record


def live_record(client: Any, name: str, dirpath: str | None, owners_here: Container[bytes]) -> PoolRecord | None:
    """The record of the live pool ``name`` (and ``dirpath``) to attach to, or None: a pool of
    this process (its owner token in ``owners_here``) is live; one whose owner was this
    process's and is gone (dropped without close()) is withdrawn, its queues being released (they
    are placed again, not attached to); any other owner must be seen alive
    (:func:`_confirmed_owner`)."""
    record = lookup(client, name, dirpath)
    if record is None:
        return None
    if record.owner_token in owners_here:
        return record
    if record.owner_client == str(client.id):
        withdraw(client, record)
        return None
    return _confirmed_owner(client, record)


def _confirmed_owner(client: Any, record: PoolRecord) -> PoolRecord | None:
    """``record`` if its owner is alive, else None (withdrawn): a program restarted at once
    after its driver was killed finds the dead driver's record still there, its client not
    yet gone from the scheduler; attached, its queues would shut down under it. On the owner's
    host its process tells; elsewhere the record is looked up again after OWNER_SETTLE."""
    state = owner_state(record.owner_process)
    if state == "alive":
        return record
    if state == "unknown":
        time.sleep(OWNER_SETTLE)
        again = lookup(client, record.name, record.dirpath)  # withdrawn if its client left
        if again is not None and again.owner_token == record.owner_token:
            return again
        seen = f"its client left the cluster within {OWNER_SETTLE:g} s"
    else:
        withdraw(client, record)
        seen = f"its process {record.owner_process.pid} on this host is dead or dying"
    logger.warning(
        "pool %s: the pool registered under this name is not attached to: its owner is gone (%s). "
        "This pool places the queues itself once the dead owner's brokers let go of them, and runs "
        "what they stored",
        record.name,
        seen,
    )
    return None


def not_found(client: Any, name: str, dirpath: str | None) -> ClosedError:
    """The error of an attach to ``name`` (and ``dirpath``) that found no live pool, naming the
    pools of that name published with another ``dirpath``, if any."""
    where = f" with dirpath {dirpath}" if dirpath else ""
    others = [d for d in published_as(client, name) if d != dirpath]
    hint = "".join(
        f"; a transient pool {name!r} is published: attach without dirpath" if d is None
        else f"; a durable pool {name!r} is published with dirpath={d!r}: pass it"
        for d in others[:3]
    )
    return ClosedError(f"no live zdq pool named {name!r}{where} on this cluster{hint}")


def published_as(client: Any, name: str) -> list[str | None]:
    """The ``dirpath`` of every pool named ``name`` published on the cluster (None: a transient
    one), live or stale: what a lookup that found nothing tells its caller to pass instead."""
    keys = scheduler_call(client, f"the pools named {name}", client.list_datasets)
    durable = registry_key(name, "")
    return [None if key == registry_key(name, None) else key[len(durable):] for key in records_named(name, keys)]


def records_named(name: str, keys: Iterable[Any]) -> list[str]:
    """Of the cluster's dataset ``keys``, those of the records of pools named ``name`` (transient,
    or durable under any dirpath)."""
    plain, durable = registry_key(name, None), registry_key(name, "")
    return [key for key in keys if isinstance(key, str) and (key == plain or key.startswith(durable))]


def owner_state(owner: OwnerProcess) -> str:
    """``"alive"``, ``"dead"`` (gone, a zombie, exiting, or SIGKILL pending: its queues are about
    to close though the scheduler may still list its client), or ``"unknown"`` (another host, or
    no /proc). Reads /proc only."""
    if not owner.host or owner.host != _host_id():
        return "unknown"
    stat = _read(f"/proc/{owner.pid}/stat")
    if stat is None:
        return "dead" if not os.path.exists(f"/proc/{owner.pid}") else "unknown"
    return _judge(_stat_fields(stat), _read(f"/proc/{owner.pid}/status") or "", owner.started)


def _judge(fields: list[str], status: str, started: str) -> str:
    """The verdict of :func:`owner_state` from a process's /proc stat fields (those after its
    name: state first) and status text."""
    if len(fields) < 20 or fields[19] != started:
        return "dead"  # its pid is another process's now
    if fields[0] in ("Z", "X", "x") or int(fields[6]) & _PF_EXITING:
        return "dead"
    for line in status.splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & _SIGKILL_BIT:
            return "dead"
    return "alive"


def _host_id() -> str:
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return f"{boot.strip()}:{namespace}" if boot else ""


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _stat_fields(stat: str) -> list[str]:
    """The fields of /proc/PID/stat after the process name (which may hold spaces and parens)."""
    return stat[stat.rfind(")") + 2 :].split()


def withdraw(client: Any, record: PoolRecord) -> None:
    try:
        key = registry_key(record.name, record.dirpath)
        current = scheduler_call(client, f"the lookup of pool {record.name}", client.get_dataset, key, default=None)
        if isinstance(current, PoolRecord) and current.owner_token == record.owner_token:
            scheduler_call(client, f"the withdrawal of pool {record.name}", client.unpublish_dataset, key)
    except Exception as e:  # the scheduler may be going away with the cluster
        logger.debug("could not withdraw pool %s: %s", record.name, e)

"""Which worker serves which queue, as the pools' registry says: what the monitor checks reports by.

A ``zdq-report`` can come from any task (it writes to its worker's stream as the feed does), so
the monitor keeps a queue's entry only from the worker that the queue's pool names for it in its
registry record (:mod:`zdq.client.registry`: a dataset its owner publishes on this scheduler after
placing the queues, and again after placing one anew), and a consumer's entry only for a pool that
has a record.

Ownership: :class:`RegistryPlacements` is read and refreshed on the scheduler's event loop only,
by the monitor. It reads the scheduler's published datasets in place (no RPC): a record is
decoded once per version (its owner replaces the dataset whole when it publishes again), so a
report costs one pass over the datasets' keys.

>>> fixed = FixedPlacements({"jobs": {"jobs-queue-0": {"tcp://a"}}})
>>> fixed.holds("jobs", "jobs-queue-0", "tcp://a"), fixed.holds("jobs", "jobs-queue-0", "tcp://b")
(True, False)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from zdq.client.registry import PoolRecord, registry_key

__all__ = ["FixedPlacements", "Placements", "RegistryPlacements"]

logger = logging.getLogger(__name__)

#: Every pool's record is published under a key that starts so (``zdq-pool:<name>[@<dir>]``).
_PREFIX = registry_key("", None)

# pool name -> queue name -> the workers named for it (a set: two pools of one name, in two
# directories, each have a record, and their queues' names repeat)
_Index = dict[str, dict[str, frozenset[str]]]


class Placements(Protocol):
    """Where the pools' queues are: what a report's entries are checked against."""

    def refresh(self) -> None:
        """Read the records again if they changed (once per report)."""

    def holds(self, pool: str, queue: str, worker: str) -> bool:
        """Whether ``pool``'s record names ``worker`` as the worker of its queue ``queue``."""

    def has_pool(self, pool: str) -> bool:
        """Whether a pool named ``pool`` has a record."""


class FixedPlacements:
    """Placements given once (pool -> queue -> workers): for the monitor outside a scheduler."""

    def __init__(self, placed: Mapping[str, Mapping[str, Iterable[str]]]) -> None:
        self._index: _Index = {p: {q: frozenset(w) for q, w in queues.items()} for p, queues in placed.items()}

    def refresh(self) -> None:
        pass

    def holds(self, pool: str, queue: str, worker: str) -> bool:
        return worker in self._index.get(pool, {}).get(queue, ())

    def has_pool(self, pool: str) -> bool:
        return pool in self._index


class RegistryPlacements:
    """The placements that the pools' records on ``scheduler`` name (its published datasets)."""

    def __init__(self, scheduler: Any) -> None:
        self._scheduler = scheduler
        # dataset key -> (the published data object, its record or None): kept by identity, so
        # that a record published again is decoded again and an unchanged one never is.
        self._decoded: dict[str, tuple[Any, PoolRecord | None]] = {}
        self._index: _Index = {}

    def refresh(self) -> None:
        extension = getattr(self._scheduler, "extensions", {}).get("publish")
        datasets = getattr(extension, "datasets", None)
        if not isinstance(datasets, dict):
            self._decoded, self._index = {}, {}
            return
        decoded: dict[str, tuple[Any, PoolRecord | None]] = {}
        changed = False
        for key, entry in datasets.items():
            if not (isinstance(key, str) and key.startswith(_PREFIX)):
                continue
            data = entry.get("data") if isinstance(entry, dict) else None
            known = self._decoded.get(key)
            if known is not None and known[0] is data:
                decoded[key] = known
                continue
            decoded[key] = (data, _record(key, data))
            changed = True
        if changed or decoded.keys() != self._decoded.keys():
            self._index = _index(record for _, record in decoded.values() if record is not None)
        self._decoded = decoded

    def holds(self, pool: str, queue: str, worker: str) -> bool:
        return worker in self._index.get(pool, {}).get(queue, ())

    def has_pool(self, pool: str) -> bool:
        return pool in self._index


def _record(key: str, data: Any) -> PoolRecord | None:
    """The record published under ``key``, or None (logged) if it is none."""
    try:
        from distributed.protocol.serialize import Serialized, deserialize

        if isinstance(data, Serialized):  # as the scheduler keeps what clients publish
            data = deserialize(data.header, data.frames)
    except Exception as e:  # a dataset of another program under our prefix: not a pool
        logger.warning("zdq monitor: the dataset %s could not be read as a pool's record: %s", key[:256], e)
        return None
    if not isinstance(data, PoolRecord):
        logger.warning("zdq monitor: the dataset %s is no pool's record (%s)", key[:256], type(data).__name__)
        return None
    return data


def _index(records: Iterable[PoolRecord]) -> _Index:
    index: dict[str, dict[str, set[str]]] = {}
    for record in records:
        queues = index.setdefault(record.name, {})
        for queue, worker in zip(record.queue_names, record.workers):
            if worker:
                queues.setdefault(queue, set()).add(worker)
    return {pool: {q: frozenset(w) for q, w in queues.items()} for pool, queues in index.items()}

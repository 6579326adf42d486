"""In-memory storage: the backend of transient queues, and the stand-in of the durable one."""

from __future__ import annotations

from collections.abc import Iterable

from zdq.storage.base import ChunkMeta, Storage

__all__ = ["MemoryStorage"]


class MemoryStorage(Storage):
    """Chunks held in the broker's memory; lost with its process.

    >>> from zdq.storage import MemoryStorage, ChunkMeta
    >>> s = MemoryStorage()
    >>> s.open()
    >>> [chunk_id] = s.put_many([(ChunkMeta(b"d" * 16, 1, 10), b"payload")])
    >>> s.lease().payload
    b'payload'
    """

    durable = False

    def __init__(self) -> None:
        super().__init__()
        self._payloads: dict[int, object] = {}

    def _scan(self) -> Iterable[tuple[int, ChunkMeta, str | None]]:
        return ()

    def _write(self, records: list[tuple[int, ChunkMeta, object]], dead: dict[int, str] | None = None) -> None:
        for chunk_id, _, payload in records:
            self._payloads[chunk_id] = payload

    def _read(self, chunk_id: int, with_broker: bool = False) -> object:
        return self._payloads[chunk_id]

    def _delete(self, chunk_ids: list[int]) -> None:
        for chunk_id in chunk_ids:
            del self._payloads[chunk_id]

    def _mark_dead(self, chunk_id: int, reason: str) -> None:
        pass

    def _unmark_dead(self, chunk_ids: list[int]) -> None:
        pass

    def _close(self) -> None:
        self._payloads.clear()

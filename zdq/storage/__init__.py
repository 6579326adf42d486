"""Where a queue keeps its chunks: the contract and its backends."""

from zdq.storage.base import ChunkMeta, DeadLetter, Leased, Storage, StorageCounts
from zdq.storage.lmdb import LMDBStorage
from zdq.storage.memory import MemoryStorage

__all__ = ["ChunkMeta", "DeadLetter", "Leased", "Storage", "StorageCounts", "MemoryStorage", "LMDBStorage"]

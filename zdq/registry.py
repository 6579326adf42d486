"""Moved to :mod:`zdq.client.registry`; this path re-exports it for one release."""

from zdq.client.registry import PoolRecord, lookup, publish, registry_key, withdraw

__all__ = ["PoolRecord", "registry_key", "publish", "lookup", "withdraw"]

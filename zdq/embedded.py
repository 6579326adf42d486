"""Moved to :mod:`zdq.client.cluster` (and ``local()`` to :mod:`zdq.client.local`); this path
re-exports them for one release."""

from zdq.client.cluster import OwnedCluster, cluster_for
from zdq.client.cluster import parallel_of as _parallel  # noqa: F401 - the old private name, still used
from zdq.client.local import local

__all__ = ["OwnedCluster", "cluster_for", "local"]

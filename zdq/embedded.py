"""Moved to :mod:`zdq.client.cluster`; this path re-exports it for one release."""

from zdq.client.cluster import OwnedCluster, _parallel, cluster_for, local

__all__ = ["OwnedCluster", "cluster_for", "local"]

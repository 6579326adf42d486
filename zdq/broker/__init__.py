"""The broker: one queue on a worker.

- :mod:`zdq.broker.core`: the loop over a ROUTER socket (peers, credit, routing of results);
- :mod:`zdq.broker.leases`: the lease table, the one state of every chunk of the queue;
- :mod:`zdq.broker.actor`: the Dask actor that places the loop on a worker.
"""

from zdq.broker.actor import Broker
from zdq.broker.core import BrokerCore, BrokerCounters
from zdq.broker.leases import LeaseTable, QueueCounts

__all__ = ["Broker", "BrokerCore", "BrokerCounters", "LeaseTable", "QueueCounts"]

"""The broker: one queue on a worker.

- :mod:`zdq.broker.core`: the loop over a ROUTER socket (its route table, group commit);
- :mod:`zdq.broker.peers`: the peers heard from, and the consumers' credit;
- :mod:`zdq.broker.dispatch`: chunks out to consumers with credit, READY to those without;
- :mod:`zdq.broker.routing`: results to drivers (who gets which, resends, receipts, SYNC answers);
- :mod:`zdq.broker.questions`: cancellations (a driver's CANCEL asked of consumers, ``zdq purge``);
- :mod:`zdq.broker.leases`: the lease table, the one state of every chunk of the queue;
- :mod:`zdq.broker.schedules`: the queue's schedules;
- :mod:`zdq.broker.actor`: the Dask actor that places the loop on a worker.
"""

from zdq.broker.actor import Broker
from zdq.broker.core import BrokerCore, BrokerCounters
from zdq.broker.leases import LeaseTable, QueueCounts

__all__ = ["Broker", "BrokerCore", "BrokerCounters", "LeaseTable", "QueueCounts"]

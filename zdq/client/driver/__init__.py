"""The driver: the client-side end of a QueuePool's data plane, in three parts and a facade.

==============  ===========================================================================
module          job
==============  ===========================================================================
``records``     a chunk's record from submission to its last result
``ledger``      the accounting, no I/O: records, buffers and bounds, submission, coalescing,
                confirms, brokers lost or rerouted (one lock)
``outcomes``    each task's outcome decided once (results, failures, cancels), the results store
                and the counters: no I/O, under the ledger's lock
``links``       each broker's link: UP / DOWN / RECOVERING / UNREACHABLE, window, receipts (the
                I/O thread's; a published snapshot for the others)
``requests``    the one table of pending requests to brokers, keyed by token (the I/O thread's)
``loop``        the I/O thread: a control queue whose commands return futures, a route table
                for the brokers' messages
``facade``      :class:`Driver`, what the pools call
==============  ===========================================================================

Each module's docstring holds its ownership table.
"""

from zdq.client.driver.facade import Driver
from zdq.client.driver.ledger import NO_CONSUMER, first_task_id
from zdq.client.driver.links import LinkState

__all__ = ["Driver", "LinkState", "NO_CONSUMER", "first_task_id"]

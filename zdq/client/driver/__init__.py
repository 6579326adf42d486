"""The driver: the client-side end of a QueuePool's data plane, in three parts and a facade.

==============  ===========================================================================
module          job
==============  ===========================================================================
``ledger``      the accounting, no I/O: records, buffers and bounds, confirm / settle / fail /
                cancel, results and counters (one lock)
``links``       each broker's link: UP / DOWN / RECOVERING / UNREACHABLE, window, receipts (the
                I/O thread's; a published snapshot for the others)
``loop``        the I/O thread: a control queue whose commands return futures, one table of
                pending requests by token, a route table for the brokers' messages
``facade``      :class:`Driver`, what the pools call
==============  ===========================================================================

Each module's docstring holds its ownership table.
"""

from zdq.client.driver.facade import Driver
from zdq.client.driver.ledger import NO_CONSUMER, first_task_id
from zdq.client.driver.links import LinkState

__all__ = ["Driver", "LinkState", "NO_CONSUMER", "first_task_id"]

"""Consumers: the Dask actor that executes tasks, and the classes users subclass.

A :class:`Consumer` actor connects a DEALER to every broker of its pool and pulls chunks with
credit: at most ``prefetch`` chunks held or asked for, over all brokers, so the next one is already
there when one finishes. It answers heartbeats and sends results and acknowledgements. Tasks never
run on the Dask worker's event loop or executor.

With ``max_concurrency`` 1 (the default), the thread that owns the sockets runs each chunk itself:
handing it to another thread and back cost two thread wake-ups per chunk, a tenth of a single
task's round trip. A second thread stands by; when a chunk has run for 50 ms it takes the sockets
over, so heartbeats, credit and control go on, and the first thread stands by in turn once its
chunk is done. Chunks still run one at a time. With ``max_concurrency`` > 1, an execution thread
unpickles chunks and fans their tasks out to that many task threads.

Modules: :mod:`~zdq.consumer.base` (what users subclass), :mod:`~zdq.consumer.actor` (the control
plane), :mod:`~zdq.consumer.link` (sockets, heartbeats, the hand-over, the route table; it runs the
credit and sends what it decides), :mod:`~zdq.consumer.credit` (what to ask each broker for, pure),
:mod:`~zdq.consumer.runner` (running chunks), :mod:`~zdq.consumer.run` (one chunk's run: its
values, errors and started tasks), :mod:`~zdq.consumer.attempts` (a task's attempts under its
options: time limits, retries, dead letters, paced starts), :mod:`~zdq.consumer.policy` (retries
and dead letters, pure), :mod:`~zdq.consumer.hard` (hard time limits: child processes),
:mod:`~zdq.consumer.daskqueue_loop` (daskqueue's consume loop, for a consumer class placed as a
Dask actor by hand: not zdq's path).

Who owns what
-------------
The *socket owner* is ``zdq-consumer-<name>``, or with ``max_concurrency`` 1 whichever of it and
``zdq-standby-<name>`` :class:`~zdq.consumer.link.Handover` names; ownership moves only there.

=============================  ===================================  ===================================
State                          Owner (reads and writes)             Other threads
=============================  ===================================  ===================================
sockets, poller, waker (recv)  socket owner                         ``Waker.wake()`` from any thread
credit, held chunks, fetch     socket owner runs ``Credit`` (pure;  actor reads ``in_flight`` (stats)
times, rotation                it sends through the link's port)
route table, heartbeat         socket owner (``Link``)              none
outbox                         socket owner sends                   any thread appends (``post``)
control (moved brokers)        socket owner applies                 actor appends (``set_endpoint``)
inline chunk queue             socket owner (max_concurrency 1)     none
chunk queue                    ``zdq-exec-<name>`` takes            socket owner puts
task queue                     ``zdq-task-<name>-<i>`` take         ``zdq-exec-<name>`` puts
a chunk's values and errors    its task threads, under its lock     the last one reports it
hand-over (owner, since)       under ``Handover.lock``              the running chunk's thread
counters                       ``chunks_received``: socket owner;   actor reads (stats)
                               others under ``Counters.lock``
stop, fetching events          actor sets and clears                every thread reads
stop's deadline, ``closed``    the actor sets the deadline (before  the socket owner reads the
                               ``stop``), the socket owner sets     deadline; ``stop()`` waits for
                               ``closed`` (the sockets closed)      ``closed``
child processes (hard limits)  ``Runner.children`` (its lock); a    ``Runner.shutdown`` kills them all
                               busy one is lent to one thread
=============================  ===================================  ===================================

A task with a time limit runs on its own ``zdq-timed-<name>-<task id>`` thread; with ``hard=True``,
in a child process instead (:mod:`~zdq.consumer.hard`), killed at its limit.
"""

from zdq.consumer.actor import Consumer
from zdq.consumer.base import ConsumerBaseClass, DummyConsumer, GeneralConsumer, Message

__all__ = [  # noqa: RUF022 - grouped by role
    # what users subclass
    "ConsumerBaseClass",
    "GeneralConsumer",
    "DummyConsumer",
    "Message",
    # the actor
    "Consumer",
]

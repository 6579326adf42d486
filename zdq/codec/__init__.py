"""What travels and is stored: tasks and chunks, results, timing, schedule arithmetic.

Every side imports this floor (the client, brokers, consumers); it imports none of them, and nothing
in it touches a socket, a thread, a clock it was not handed, or a disk. Its imports are the standard
library, pickle and cloudpickle, croniter, :mod:`zdq.errors` and :mod:`zdq.config`;
``tests/unit/test_imports.py`` holds it to that.

=================  ==============================================================================
module             what it owns
=================  ==============================================================================
``tasks``          chunk kinds, entries, ``dumps_chunk``/``loads_chunk``, cancelled placeholders,
                   the loop that runs a chunk's entries
``results``        results (``dumps_results``/``loads_results``), :class:`ErrorInfo`, sealing,
                   naming what cannot be pickled, reading names that moved
``timing``         a submission's release time and priority, checked at the call
``schedules``      when a schedule ticks, what a missed tick does, how a schedule is stored
``names``          the rules every name a user gives follows (a pool's, a schedule's)
``chunking``       where chunks are cut (by count, by consecutive ids, by bytes)
=================  ==============================================================================

Ownership: none of these modules holds mutable state. Their constants are fixed at import; their
objects (:class:`~zdq.codec.tasks.TaskOptions`, :class:`~zdq.codec.timing.Timing`,
:class:`~zdq.codec.chunking.Chunking`, :class:`~zdq.codec.schedules.ScheduleRecord`...) are frozen
dataclasses, owned by whoever holds them. Their old top-level paths (``zdq.tasks``,
``zdq.serialization``, ``zdq.timing``, ``zdq.schedules``, ``zdq.chunking``) re-export them for one
release.

This package imports none of its modules itself: ``import zdq.codec`` costs nothing.
"""

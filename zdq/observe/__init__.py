"""Seeing and steering a live pool from outside the program that made it.

- :mod:`zdq.observe.feed` (workers): each worker process sends the counters of its brokers and
  consumers to the scheduler, one message a second over Dask's own worker→scheduler stream.
- :mod:`zdq.observe.monitor` (scheduler): the :class:`~zdq.observe.monitor.Monitor` extension that
  keeps the last report of every queue and consumer, with rate history; installed once per cluster.
- :mod:`zdq.observe.placements` (scheduler): which worker serves which queue, from the pools'
  registry records: whose report entries the monitor believes.
- :mod:`zdq.observe.page` and :mod:`zdq.observe.metrics` (scheduler): the ``/zdq`` dashboard page
  and the ``zdq_*`` Prometheus metrics on the scheduler's HTTP server.
- :mod:`zdq.observe.remote` (any process): what ``zdq status`` and ``zdq dead-letters`` call.
"""

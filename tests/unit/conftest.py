"""The unit tier: pure code only (no sockets, threads, subprocesses or clusters); `pytest -m unit`."""

"""Imported by the server that forks the suite's LocalCluster worker processes (``conftest``): a
worker sent SIGUSR1 writes every thread's stack to its stderr, and carries on. The leak check
sends it to a worker that did not answer, so that a hang shows where it hangs in the run's log,
even while a thread holds the GIL in C code (faulthandler writes from its signal handler)."""

import faulthandler
import signal
import sys

faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)

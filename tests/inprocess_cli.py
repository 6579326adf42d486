"""The ``zdq`` command run in the test's own process, for the checks that need no process of
their own.

Each ``python -m zdq.cli`` costs an import of Dask and distributed (a second or more on two
cores): a test that runs a command family many times runs it once as a subprocess, as a user
does, and the other runs here, through :func:`zdq.cli.main`. What the command prints is kept as a
subprocess would keep it: its stdout, its stderr, and the log records that its logging set-up
(WARNING and above; ``distributed`` at ERROR) would have written to its stderr from the command's
own threads, so a check that stderr holds one line still sees a stray warning or traceback.
"""

from __future__ import annotations

import contextlib
import io
import logging
import subprocess
import threading

__all__ = ["zdq_here"]


def zdq_here(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``zdq ARGS`` in this process: exit status, stdout and stderr, as ``subprocess.run``
    gives them. ``stdin`` is what the command reads (never a terminal, as for a piped run)."""
    from zdq.cli import main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setLevel(logging.WARNING)
    # Only the command's own records: not those of the test's pools, which share this process.
    caller = threading.get_ident()
    handler.addFilter(lambda r: r.thread == caller or str(r.threadName).startswith("zdq-cli"))
    root, dist = logging.getLogger(), logging.getLogger("distributed")
    kept = (list(root.handlers), root.level, dist.level)
    root.addHandler(handler)
    try:
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            _stdin(stdin),
        ):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse: --version, --help, a usage error
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        # main() configures logging as a process of its own would: undone here.
        root.handlers[:] = kept[0]
        root.setLevel(kept[1])
        dist.setLevel(kept[2])
    return subprocess.CompletedProcess(["zdq", *args], code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _stdin(text: str):  # type: ignore[no-untyped-def]
    import sys

    saved, sys.stdin = sys.stdin, io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = saved

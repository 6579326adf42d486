"""The ``zdq`` command's entry point, kept outside the ``zdq`` package.

Importing zdq (Dask, distributed, pyzmq) takes about a second. A Ctrl-C during that import ended
the command with a traceback; here it ends it as a Ctrl-C during the command does, with status 130
and nothing printed. :func:`zdq.cli.main` does the rest.
"""

from __future__ import annotations


def main() -> int:
    try:
        from zdq.cli import main as command

        return command()
    except KeyboardInterrupt:
        return 130

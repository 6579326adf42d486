"""``python -m zdq``: the ``zdq`` command (:func:`zdq.cli.main`), for an environment whose
scripts directory is not on ``PATH``."""

import sys

from zdq.cli import main

if __name__ == "__main__":
    sys.exit(main())

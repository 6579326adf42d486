"""Hangs at import: only a hard-limited task may name it (its child is killed at the limit)."""

import time

time.sleep(300)


def never() -> int:
    return 1

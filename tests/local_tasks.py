"""Tasks the zdq.local() context tests insert: importable by worker processes, as user code is."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from zdq import Task


@dataclass
class Mark(Task):
    """Leaves a file named after ``i`` in ``directory``: what ran is seen after the pool is gone."""

    directory: str
    i: int
    seconds: float = 0.0

    def execute(self) -> int:
        if self.seconds:
            time.sleep(self.seconds)
        with open(os.path.join(self.directory, str(self.i)), "w"):
            pass
        return self.i


def marked(directory: str) -> set[int]:
    return {int(name) for name in os.listdir(directory)}

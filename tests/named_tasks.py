"""Tasks the tests submit by name ("tests.named_tasks:double"): the test process never imports
this module, the consumers do (the workers of a LocalCluster share the tests' sys.path)."""

from __future__ import annotations


def double(x: int) -> int:
    return 2 * x


class Maths:
    @staticmethod
    def square(x: int) -> int:
        return x * x


NOT_CALLABLE = 42

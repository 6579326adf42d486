# Types of the compiled zdq._untracked (zdq/_untracked.c).
from collections.abc import Sequence
from typing import Any, TypeVar

_T = TypeVar("_T")

def slotted(cls: type[_T], n: int, slot_a: Any, value_a: object, slot_b: Any, values_b: Sequence[object], /) -> list[_T]: ...
def track(obj: object, /) -> None: ...

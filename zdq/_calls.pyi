# Types of the compiled zdq._calls (zdq/_calls.c).
from typing import Any, Literal

def shape(calls: object, /) -> Literal[False] | tuple[Any, int]: ...

"""The pools are facades over mixins that declare what they need as stubs (``raise
NotImplementedError`` or ``...``): no attribute of a pool may resolve to such a stub, which a
base order or a missing definition would make happen silently."""

from __future__ import annotations

import inspect

import pytest

from zdq.client.consumer_pool import ConsumerPool
from zdq.client.queue_pool import QueuePool

pytestmark = pytest.mark.unit


def _stubs(cls: type) -> list[str]:
    found = []
    for name in dir(cls):
        for klass in cls.__mro__:
            if name not in klass.__dict__:
                continue
            obj = klass.__dict__[name]
            fn = getattr(obj, "fget", obj)
            fn = getattr(fn, "__wrapped__", fn)
            if inspect.isfunction(fn):
                body = inspect.getsource(fn).strip()
                if body.endswith("raise NotImplementedError") or body.endswith(": ..."):
                    found.append(f"{name} (from {klass.__name__})")
            break
    return found


@pytest.mark.parametrize("cls", [QueuePool, ConsumerPool])
def test_no_attribute_of_a_pool_resolves_to_a_mixins_stub(cls: type) -> None:
    assert _stubs(cls) == []
